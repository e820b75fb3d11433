"""demo-data: valid DICOM, real pairs, reproducible by seed, physically plausible rendering."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from conftest import require_tool
from dicom_node.cli import main
from dicom_node.phantoms import MU_SOFT, Phantom, render

SIZE = 128


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo-data", str(out), "--count", "3", "--test-count", "1", "--size", str(SIZE), "--seed", "7"]) == 0
    return out


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.dcm"))


def test_layout_and_pairs(demo_dir: Path) -> None:
    train_names = _files(demo_dir / "A")
    assert train_names == _files(demo_dir / "B") == ["0000_chest.dcm", "0001_chest.dcm", "0002_knee.dcm"]
    assert _files(demo_dir / "test" / "A") == _files(demo_dir / "test" / "B") == ["0003_chest.dcm"]
    assert (demo_dir / "manifest.json").is_file()


def test_headers_and_pixels(demo_dir: Path) -> None:
    for name in _files(demo_dir / "A"):
        a = pydicom.dcmread(demo_dir / "A" / name)
        b = pydicom.dcmread(demo_dir / "B" / name)
        assert a.SOPClassUID == b.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
        assert (a.PhotometricInterpretation, b.PhotometricInterpretation) == ("MONOCHROME1", "MONOCHROME2")
        assert a.PatientID == b.PatientID and a.StudyInstanceUID == b.StudyInstanceUID
        assert a.SeriesInstanceUID != b.SeriesInstanceUID and a.SOPInstanceUID != b.SOPInstanceUID
        assert a.Manufacturer != b.Manufacturer
        assert (a.Rows, a.Columns, a.BitsStored) == (SIZE, SIZE, 12)
        assert float(a.PixelSpacing[0]) > 0
        pa, pb = a.pixel_array.astype(float), b.pixel_array.astype(float)
        assert pa.max() <= 4095 and pb.max() <= 4095 and pb.max() > 2000  # uses the 12-bit range
        # A pair is the same exposure: A (MONOCHROME1, inverted) anti-correlates with B ...
        assert np.corrcoef(pa.ravel(), pb.ravel())[0, 1] < -0.8
        # ... but the two styles really differ.
        assert np.abs((4095 - pa) - pb).mean() > 100
        if a.BodyPartExamined == "KNEE":
            assert a.Laterality in ("L", "R")
        else:
            assert a.BodyPartExamined == "CHEST" and "Laterality" not in a
    # Different phantoms are different anatomy.
    p0 = pydicom.dcmread(demo_dir / "B" / "0000_chest.dcm").pixel_array.astype(float)
    p1 = pydicom.dcmread(demo_dir / "B" / "0001_chest.dcm").pixel_array.astype(float)
    assert np.abs(p0 - p1).mean() > 50


def test_reproducible_by_seed(demo_dir: Path, tmp_path: Path) -> None:
    again, other = tmp_path / "again", tmp_path / "other"
    assert main(["demo-data", str(again), "--count", "1", "--test-count", "0", "--size", str(SIZE), "--seed", "7"]) == 0
    assert main(["demo-data", str(other), "--count", "1", "--test-count", "0", "--size", str(SIZE), "--seed", "8"]) == 0
    for style in ("A", "B"):
        ref = pydicom.dcmread(demo_dir / style / "0000_chest.dcm")
        same = pydicom.dcmread(again / style / "0000_chest.dcm")
        diff = pydicom.dcmread(other / style / "0000_chest.dcm")
        assert same.PixelData == ref.PixelData
        assert same.SOPInstanceUID == ref.SOPInstanceUID and same.StudyInstanceUID == ref.StudyInstanceUID
        assert diff.PixelData != ref.PixelData and diff.SOPInstanceUID != ref.SOPInstanceUID


def test_dciodvfy_no_errors(demo_dir: Path) -> None:
    tool = require_tool("dciodvfy")
    for path in sorted(demo_dir.rglob("*.dcm")):
        result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"


def test_beer_lambert_and_quantum_noise() -> None:
    """A uniform slab: mean raw signal = mu * t, noise std = 1/sqrt(transmitted quanta)."""
    t_cm, dose, sf = 10.0, 20000.0, 0.3
    ph = Phantom(soft=np.full((256, 256), t_cm), bone=np.zeros((256, 256)), pixel_spacing_mm=0.5,
                 body_part="CHEST", dose=dose, scatter_fraction=sf)
    raw = render(ph, np.random.default_rng(0))
    assert raw.mean() == pytest.approx(MU_SOFT * t_cm, rel=0.01)
    quanta = dose * np.exp(-MU_SOFT * t_cm) * (1 + sf)
    assert raw.std() == pytest.approx(1 / np.sqrt(quanta), rel=0.1)


def test_bad_size_is_a_user_error(tmp_path: Path, capsys) -> None:
    assert main(["demo-data", str(tmp_path / "x"), "--size", "8"]) == 1
    assert "--size" in capsys.readouterr().err

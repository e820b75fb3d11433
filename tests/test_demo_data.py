"""demo-data: valid DICOM, real pairs, reproducible by seed, physically plausible rendering."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import require_tool

from dicom_node.cli import main
from dicom_node.demo.phantoms import MU_SOFT, Phantom, render
from dicom_node.demo.vendor_processing import STYLE_PAIRS, VendorStyle
from dicom_node.demo.writer import _uid, case_dataset, render_case, write_demo_data
from dicom_node.errors import UserError

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


# --------------------------------------------------------------------------- style pairs, --unpaired

UNPAIRED_SEED = 7


def _ds(folder: Path) -> dict[str, pydicom.Dataset]:
    return {p.name: pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))}


@pytest.fixture(scope="module")
def unpaired_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unpaired")
    assert main(["demo-data", str(out), "--count", "3", "--test-count", "2", "--size", str(SIZE),
                 "--seed", str(UNPAIRED_SEED), "--unpaired", "--style-pair", "edges"]) == 0
    return out


def test_unpaired_layout(unpaired_dir: Path) -> None:
    assert _files(unpaired_dir / "A") == ["a0000_chest.dcm", "a0001_chest.dcm", "a0002_knee.dcm"]
    assert _files(unpaired_dir / "B") == ["b0003_chest.dcm", "b0004_chest.dcm", "b0005_knee.dcm"]
    # Held-out TRUE pairs: later phantoms, the same name in both styles.
    assert _files(unpaired_dir / "test" / "A") == _files(unpaired_dir / "test" / "B") == \
        ["0006_chest.dcm", "0007_chest.dcm"]
    manifest = json.loads((unpaired_dir / "manifest.json").read_text())
    pair = STYLE_PAIRS["edges"]
    assert manifest["unpaired"] is True and manifest["style_pair"] == "edges"
    assert manifest["styles"] == json.loads(json.dumps({"A": pair.a.describe(), "B": pair.b.describe()}))
    assert manifest["files"] == {"A": _files(unpaired_dir / "A"), "B": _files(unpaired_dir / "B"),
                                 "test": ["0006_chest.dcm", "0007_chest.dcm"]}


def test_unpaired_a_and_b_share_nothing(unpaired_dir: Path) -> None:
    a, b = _ds(unpaired_dir / "A"), _ds(unpaired_dir / "B")
    test = _ds(unpaired_dir / "test" / "A") | {"B/" + k: v for k, v in _ds(unpaired_dir / "test" / "B").items()}
    assert not set(a) & set(b)
    for attr in ("PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                 "AccessionNumber"):
        va, vb, vt = ({str(getattr(d, attr)) for d in g.values()} for g in (a, b, test))
        assert len(va) == len(vb) == 3 and not va & vb and not va & vt and not vb & vt, attr
    assert not {d.PixelData for d in a.values()} & {d.PixelData for d in b.values()}
    # Content: A holds phantoms 0..2 in style A only, B phantoms 3..5 in style B only.
    pair = STYLE_PAIRS["edges"]
    first_b = render_case(3, SIZE, UNPAIRED_SEED, {"B": pair.b})
    assert np.array_equal(b["b0003_chest.dcm"].pixel_array, first_b.stored["B"])
    first_a = render_case(0, SIZE, UNPAIRED_SEED, {"A": pair.a})
    assert np.array_equal(a["a0000_chest.dcm"].pixel_array, first_a.stored["A"])
    assert all(d.Manufacturer == pair.a.manufacturer for d in a.values())
    assert all(d.Manufacturer == pair.b.manufacturer for d in b.values())


def test_unpaired_test_set_is_true_pairs(unpaired_dir: Path) -> None:
    ta, tb = _ds(unpaired_dir / "test" / "A"), _ds(unpaired_dir / "test" / "B")
    assert set(ta) == set(tb)
    for name in ta:
        a, b = ta[name], tb[name]
        assert a.PatientID == b.PatientID and a.StudyInstanceUID == b.StudyInstanceUID
        assert a.SeriesInstanceUID != b.SeriesInstanceUID and a.SOPInstanceUID != b.SOPInstanceUID
        # One exposure in two styles (both MONOCHROME2 in this pair): strongly correlated, not equal.
        pa, pb = a.pixel_array.astype(float), b.pixel_array.astype(float)
        assert np.corrcoef(pa.ravel(), pb.ravel())[0, 1] > 0.8
        assert np.abs(pa - pb).mean() > 50


def test_unpaired_cli_summary(tmp_path: Path, capsys) -> None:
    assert main(["demo-data", str(tmp_path / "u"), "--count", "1", "--test-count", "1", "--size", "64",
                 "--unpaired", "--style-pair", "tone"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "unpaired" in line and "style pair tone" in line


def test_default_is_the_classic_paired_data_set(demo_dir: Path, tmp_path: Path) -> None:
    """The default output is unchanged: same UIDs as before style pairs, no new manifest keys."""
    manifest = json.loads((demo_dir / "manifest.json").read_text())
    assert "unpaired" not in manifest and "style_pair" not in manifest
    assert set(manifest["styles"]["A"]) == set(manifest["styles"]["B"]) and "bits" not in manifest["styles"]["A"]
    a = pydicom.dcmread(demo_dir / "A" / "0000_chest.dcm")
    assert a.SOPInstanceUID == _uid(7, 0, "instance", "A") and a.StudyInstanceUID == _uid(7, 0, "study")
    explicit = tmp_path / "explicit"
    assert main(["demo-data", str(explicit), "--count", "3", "--test-count", "1", "--size", str(SIZE),
                 "--seed", "7", "--style-pair", "classic"]) == 0
    for path in sorted(demo_dir.rglob("*")):
        if path.is_file():
            assert (explicit / path.relative_to(demo_dir)).read_bytes() == path.read_bytes(), path


@pytest.mark.parametrize("name", list(STYLE_PAIRS))
def test_style_pair_headers_and_reproducible(name: str, tmp_path: Path) -> None:
    pair = STYLE_PAIRS[name]
    one, two = tmp_path / "one", tmp_path / "two"
    for out in (one, two):
        write_demo_data(out, count=1, test_count=0, size=96, seed=3, style_pair=name)
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    for rel in files:  # every byte, UIDs included
        assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel
    stored = {}
    for style in (pair.a, pair.b):
        ds = pydicom.dcmread(one / style.key / "0000_chest.dcm")
        assert ds.PhotometricInterpretation == style.photometric
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, style.bits, style.bits - 1)
        assert (ds.WindowCenter, ds.WindowWidth) == ((style.max_value + 1) // 2, style.max_value + 1)
        assert ds.Manufacturer == style.manufacturer
        px = ds.pixel_array
        assert px.max() <= style.max_value and px.max() > style.max_value // 2  # uses its range
        stored[style.key] = px.astype(float) / style.max_value
    # The two styles really differ (in display terms, after MONOCHROME1 inversion).
    disp = {k: (1 - v if STYLE_PAIRS[name].styles[k].photometric == "MONOCHROME1" else v) for k, v in stored.items()}
    assert np.abs(disp["A"] - disp["B"]).mean() > 0.01
    if name != "classic":  # another data set: other UIDs than the classic one of the same seed and index
        classic = render_case(0, 96, 3)
        assert pydicom.dcmread(one / "A" / "0000_chest.dcm").SOPInstanceUID != \
            case_dataset(classic, STYLE_PAIRS["classic"].a, 3).SOPInstanceUID


def test_style_pairs_are_varied() -> None:
    """Not one form with other numbers: the tone families, DRC and denoise differ across pairs."""
    styles = [s for p in STYLE_PAIRS.values() for s in (p.a, p.b) if isinstance(s, VendorStyle)]
    assert {s.tone for s in styles} == {"gamma", "sigmoid", "log"}
    assert {s.photometric for s in styles} == {"MONOCHROME1", "MONOCHROME2"}
    assert any(s.drc_strength > 0 for s in styles) and any(s.drc_strength == 0 for s in styles)
    assert any(s.denoise_weight > 0 for s in styles) and any(s.denoise_weight == 0 for s in styles)
    assert len({s.edges for s in styles}) >= 8
    tone = STYLE_PAIRS["tone"]
    assert not tone.a.edges and not tone.b.edges and tone.a.drc_strength == tone.b.drc_strength == 0
    assert tone.a.denoise_weight == tone.b.denoise_weight == 0 and tone.a.tone != tone.b.tone
    noise = STYLE_PAIRS["noise"]
    assert (noise.a.denoise_weight > 0) != (noise.b.denoise_weight > 0)
    assert (STYLE_PAIRS["mono"].a.photometric, STYLE_PAIRS["mono"].b.photometric) == ("MONOCHROME1", "MONOCHROME2")
    assert all(len(p.description.splitlines()) == 1 for p in STYLE_PAIRS.values())


@pytest.fixture(scope="module")
def bits_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bits")
    write_demo_data(out, count=1, test_count=1, size=SIZE, seed=5, style_pair="bits", unpaired=True)
    return out


def test_bits_pair_stores_10_and_15_bits(bits_dir: Path) -> None:
    a = pydicom.dcmread(bits_dir / "A" / "a0000_chest.dcm")
    b = pydicom.dcmread(bits_dir / "B" / "b0001_chest.dcm")
    assert (a.BitsStored, a.HighBit, b.BitsStored, b.HighBit) == (10, 9, 15, 14)
    assert 512 < a.pixel_array.max() <= 1023 and 16384 < b.pixel_array.max() <= 32767
    for style in ("A", "B"):
        t = pydicom.dcmread(bits_dir / "test" / style / "0002_knee.dcm")
        assert t.BitsStored == {"A": 10, "B": 15}[style] and t.pixel_array.max() <= (1 << t.BitsStored) - 1


def test_bits_pair_dciodvfy_no_errors(bits_dir: Path) -> None:
    tool = require_tool("dciodvfy")
    for path in (bits_dir / "A" / "a0000_chest.dcm", bits_dir / "B" / "b0001_chest.dcm"):
        result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"


def test_bad_style_pair_is_a_one_line_error(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "dicom_node", "demo-data", str(tmp_path / "x"),
                             "--style-pair", "nope", "--size", "64"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--style-pair" in lines[0] and "classic" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()  # refused before writing anything


def test_write_demo_data_keywords_and_bad_pair(tmp_path: Path) -> None:
    manifest = write_demo_data(tmp_path / "k", count=1, test_count=0, size=64, seed=0, progress=False)
    assert manifest["files"] == {"train": ["0000_chest.dcm"], "test": []}
    with pytest.raises(UserError, match="style-pair"):
        write_demo_data(tmp_path / "bad", count=1, test_count=0, size=64, style_pair="nope")

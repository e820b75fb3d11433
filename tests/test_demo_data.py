"""demo-data: valid DICOM, real pairs, reproducible by seed, physically plausible rendering."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import INTEROP, require_tool

from dicom_node.cli import main
from dicom_node.demo.nonlinear_styles import (
    NONLINEAR_PAIRS,
    PHANTOM_FULL_SCALE,
    NonlinearStyle,
    bilateral,
    clahe,
    compand,
    limited_unsharp,
    multiscale_equalise,
    phantom_scale,
    process_nonlinear,
)
from dicom_node.demo.phantoms import MU_SOFT, Phantom, gaussian_blur, make_phantom, render, smooth_noise
from dicom_node.demo.vendor_processing import STYLE_PAIRS, VendorStyle, process, to_stored
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


# --------------------------------------------------------------------------- nonlinear styles, --source real

NONLINEAR = list(NONLINEAR_PAIRS)


def _texture(shape: tuple[int, int], seed: int, scale_px: float = 3.0) -> np.ndarray:
    return smooth_noise(np.random.default_rng(seed), shape, scale_px)


def _without_tone(style: NonlinearStyle) -> NonlinearStyle:
    """The style's processing with a linear tone curve: what is left to be nonlinear is the filters."""
    return dataclasses.replace(style, tone="gamma", tone_param=1.0)


@pytest.mark.parametrize("name", NONLINEAR)
def test_nonlinear_styles_are_not_additive(name: str) -> None:
    """A linear filter F has F(u + 2d) - F(u) = 2 (F(u + d) - F(u)); these styles do not, even with a
    linear tone curve: the gain a detail gets depends on its amplitude and its neighbourhood."""
    style = _without_tone(NONLINEAR_PAIRS[name][1])
    base = 0.45 + 0.03 * _texture((96, 96), 1, 12.0)
    detail = 0.02 * _texture((96, 96), 2, 1.0)
    f0, f1, f2 = (process_nonlinear(base + k * detail, style) for k in (0, 1, 2))
    once, twice = f1 - f0, f2 - f0
    assert np.abs(twice - 2 * once).mean() > 0.05 * np.abs(twice).mean(), name
    linear = dataclasses.replace(STYLE_PAIRS[name].a, tone="gamma", tone_param=1.0)  # A: window only
    g0, g1, g2 = (process_nonlinear(base + k * detail, linear) for k in (0, 1, 2))
    assert np.abs((g2 - g0) - 2 * (g1 - g0)).max() < 1e-9  # the measure sees no nonlinearity in a linear map


def test_multiscale_gain_depends_on_amplitude() -> None:
    """Small band coefficients are lifted, large ones compressed: doubling a detail does not double it."""
    b = NONLINEAR_PAIRS["multiscale"][1]
    y, x = np.mgrid[:128, :128]
    bump = np.exp(-((y - 64.0) ** 2 + (x - 64.0) ** 2) / (2 * 2.0 ** 2))

    def out_peak(amplitude: float) -> float:
        args = (b.ms_levels, b.ms_sigma_px, b.ms_gain, b.ms_scale, b.ms_power, b.ms_residual_gain)
        return float((multiscale_equalise(0.5 + amplitude * bump, *args) - 0.5)[64, 64])

    small, small2, large, large2 = (out_peak(a) for a in (0.004, 0.008, 0.2, 0.4))
    assert small / 0.004 > 1.6  # lifted (gain 1.8 at zero amplitude; measured 1.78)
    assert large2 / 0.4 < 0.9  # compressed (measured 0.84)
    assert large2 / large < 1.6 < 1.9 < small2 / small  # doubling: x2.0 when small, x1.5 when large
    same = multiscale_equalise(0.5 + 0.2 * bump, 5, 1.0, 1.0, 0.02, 1.0, 1.0)  # gain 1, power 1: identity
    assert np.allclose(same, 0.5 + 0.2 * bump, atol=1e-9)
    c = np.linspace(-1, 1, 201)
    assert np.allclose(compand(-c, 1.8, 0.02, 0.5), -compand(c, 1.8, 0.02, 0.5))  # odd: sign(c) * g(|c|)


def test_clahe_lifts_low_contrast_more_than_high_contrast() -> None:
    tex = _texture((128, 256), 3)
    u = np.where(np.arange(256)[None, :] < 128, 0.3 + 0.01 * tex, np.clip(0.5 + 0.3 * tex, 0.02, 0.98))
    out = clahe(u, 32, 2.5)
    flat, busy = (slice(16, 112), slice(16, 96)), (slice(16, 112), slice(160, 240))  # away from the middle

    def gain(region: tuple[slice, slice]) -> float:
        return float(out[region].std() / u[region].std())

    assert gain(flat) > 2.0 and gain(flat) > 2 * gain(busy)  # measured 3.4 and 1.1
    assert gain(flat) <= 2.5 + 1.0  # bounded: clipped bins plus at most the whole tile spread evenly
    assert np.array_equal(clahe(u, 32, 2.5), out) and 0.0 <= out.min() and out.max() <= 1.0


def test_bilateral_smooths_grain_and_keeps_a_step() -> None:
    b = NONLINEAR_PAIRS["denoise"][1]
    step = np.where(np.arange(128)[None, :] < 64, 0.3, 0.6) * np.ones((128, 1))
    noisy = step + 0.005 * np.random.default_rng(4).standard_normal(step.shape)
    out = bilateral(noisy, b.denoise_sigma_px, b.denoise_range)
    flat = (slice(8, 120), slice(8, 56))
    assert out[flat].var() < 0.3 * noisy[flat].var()

    def height(img: np.ndarray) -> float:  # 2 px either side of the edge
        return float(img[8:120, 65].mean() - img[8:120, 62].mean())

    assert height(out) == pytest.approx(0.3, rel=0.03)
    assert height(gaussian_blur(noisy, b.denoise_sigma_px)) < 0.9 * 0.3  # a linear blur of the same size does not


def test_unsharp_halo_and_overshoot_are_limited() -> None:
    b = NONLINEAR_PAIRS["unsharp"][1]
    step = np.where(np.arange(128)[None, :] < 64, 0.3, 0.7) * np.ones((64, 1))
    out = limited_unsharp(step, b.usm_sigma_px, b.usm_gain, b.usm_halo, b.usm_overshoot, b.usm_radius_px)
    assert out.max() <= 0.7 + b.usm_overshoot + 1e-9 and out.min() >= 0.3 - b.usm_overshoot - 1e-9
    linear = step + b.usm_gain * (step - gaussian_blur(step, b.usm_sigma_px))
    assert linear.max() - 0.7 > 5 * b.usm_overshoot  # the plain mask would ring far beyond
    assert out.max() - 0.7 > 0.5 * b.usm_overshoot  # ... yet the edge is still enhanced
    # A small detail keeps (most of) the gain: the limits bite only on large ones.
    y, x = np.mgrid[:64, :64]
    bump = 0.5 + 0.004 * np.exp(-((y - 32.0) ** 2 + (x - 32.0) ** 2) / (2 * 1.5 ** 2))
    sharp = limited_unsharp(bump, b.usm_sigma_px, b.usm_gain, b.usm_halo, b.usm_overshoot, b.usm_radius_px)
    assert (sharp[32, 32] - 0.5) / 0.004 > 1.3


@pytest.mark.parametrize("name", NONLINEAR)
def test_nonlinear_styles_deterministic_and_in_range(name: str) -> None:
    a, b, _ = NONLINEAR_PAIRS[name]
    u = np.linspace(-0.3, 1.3, 96)[None, :] + 0.05 * _texture((96, 96), 5)  # beyond the window both ways
    for style in (a, b):
        one, two = process_nonlinear(u, style), process_nonlinear(u.copy(), style)
        assert np.array_equal(one, two)
        assert 0.0 <= one.min() and one.max() <= 1.0
        stored = to_stored(one, style)
        assert stored.max() <= style.max_value and style.bits == 12


def test_nonlinear_styles_use_absolute_values_not_the_image_content() -> None:
    """A crop, with or without a collimator border, gets the same values as the whole image where the
    filters reach no border; the percentile-windowed linear styles do not (the point of the real crops)."""
    ph = make_phantom(0, 320, 3)
    raw = render(ph, np.random.default_rng(0))
    crop = raw[24:280, 40:296].copy()
    collimated = crop.copy()
    collimated[:, :30] = PHANTOM_FULL_SCALE["CHEST"] * 0.97  # a bright collimator band on the left
    inner = (slice(120, 184), slice(136, 200))  # of the whole image; 96 px from the crop's borders
    inner_crop = (slice(96, 160), slice(96, 160))
    assert np.array_equal(raw[inner], crop[inner_crop])
    for name in ("multiscale", "denoise", "unsharp"):
        b = NONLINEAR_PAIRS[name][1]
        whole = process_nonlinear(phantom_scale(raw, "CHEST"), b)[inner]
        for part in (crop, collimated):
            assert np.abs(process_nonlinear(phantom_scale(part, "CHEST"), b)[inner_crop] - whole).max() < 2e-3, name
    linear = STYLE_PAIRS["classic"].b
    whole = process(raw, linear)[inner]
    assert np.abs(process(collimated, linear)[inner_crop] - whole).mean() > 0.02


def _check_unpaired(out: Path, pair: str) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["unpaired"] is True and manifest["style_pair"] == pair
    a, b = _ds(out / "A"), _ds(out / "B")
    ta, tb = _ds(out / "test" / "A"), _ds(out / "test" / "B")
    assert a and b and all(n.startswith("a") for n in a) and all(n.startswith("b") for n in b)
    assert not {d.PatientID for d in a.values()} & {d.PatientID for d in b.values()}
    assert set(ta) == set(tb) and ta
    styles = STYLE_PAIRS[pair].styles
    for folder, key in ((a, "A"), (b, "B"), (ta, "A"), (tb, "B")):
        for ds in folder.values():
            assert (ds.BitsStored, ds.PhotometricInterpretation) == (12, styles[key].photometric)
            assert ds.Manufacturer == styles[key].manufacturer and ds.pixel_array.max() <= 4095
    for name in ta:  # true pairs: the same exposure, same patient, shape
        assert ta[name].StudyInstanceUID == tb[name].StudyInstanceUID
        assert ta[name].pixel_array.shape == tb[name].pixel_array.shape
    return manifest


@pytest.mark.parametrize("pair", NONLINEAR)
def test_unpaired_nonlinear_pair_from_phantoms(pair: str, tmp_path: Path) -> None:
    out = tmp_path / pair
    assert main(["demo-data", str(out), "--unpaired", "--style-pair", pair, "--count", "2", "--test-count", "1",
                 "--size", "96", "--seed", "2"]) == 0
    manifest = _check_unpaired(out, pair)
    assert "source" not in manifest and manifest["styles"]["B"]["family"] == "nonlinear"


@pytest.fixture(scope="module")
def real_sources():
    """The pydicom-data radiographs; skipped without the package, except under DICOM_NODE_INTEROP=1."""
    from dicom_node.demo.real_crops import load_real_sources

    try:
        return load_real_sources()
    except UserError as exc:
        if INTEROP:
            pytest.fail(f"pydicom-data is required when DICOM_NODE_INTEROP=1: {exc}")
        pytest.skip(f"pydicom-data not installed: {exc}")


@pytest.mark.parametrize("pair", ["multiscale", "combined"])
def test_unpaired_nonlinear_pair_from_real_crops(pair: str, real_sources, tmp_path: Path) -> None:
    out = tmp_path / pair
    assert main(["demo-data", str(out), "--unpaired", "--style-pair", pair, "--source", "real", "--count", "6",
                 "--test-count", "2", "--size", "128", "--seed", "1"]) == 0
    manifest = _check_unpaired(out, pair)
    assert manifest["source"] == "real"
    crops = manifest["crops"]
    assert set(crops) == {f"train/{n}" for n in manifest["files"]["A"] + manifest["files"]["B"]} | {
        f"test/{n}" for n in manifest["files"]["test"]}
    assert {c["source"] for c in crops.values()} == {"RG1_UNCR.dcm", "RG3_UNCR.dcm"}
    # Varying field of view: sizes and positions differ, some crops collimated, some not.
    assert len({tuple(c["box"][2:]) for c in crops.values()}) >= 10
    assert all(64 <= r <= 128 and 64 <= c for r, c in (tuple(c["box"][2:]) for c in crops.values()))
    assert any(c["collimator"] for c in crops.values()) and not all(c["collimator"] for c in crops.values())
    # A, B and test never share a pixel of anatomy (per source radiograph).
    def boxes(prefix: str, source: str) -> list[list[int]]:
        return [c["box"] for k, c in crops.items() if k.startswith(prefix) and c["source"] == source]
    for source in ("RG1_UNCR.dcm", "RG3_UNCR.dcm"):
        groups = [boxes("train/a", source), boxes("train/b", source), boxes("test/", source)]
        for i, j in ((0, 1), (0, 2), (1, 2)):
            for y0, x0, h, w in groups[i]:
                for y1, x1, h1, w1 in groups[j]:
                    assert y0 + h <= y1 or y1 + h1 <= y0 or x0 + w <= x1 or x1 + w1 <= x0
    first = pydicom.dcmread(out / "A" / manifest["files"]["A"][0])
    assert "real CR" in first.DerivationDescription and first.BodyPartExamined in ("CHEST", "LEG")
    # Deterministic for a seed.
    again = tmp_path / "again"
    write_demo_data(again, count=6, test_count=2, size=128, seed=1, unpaired=True, style_pair=pair, source="real")
    for path in sorted(out.rglob("*.dcm")):
        assert (again / path.relative_to(out)).read_bytes() == path.read_bytes(), path


def test_real_crops_dciodvfy_no_errors(real_sources, tmp_path: Path) -> None:
    tool = require_tool("dciodvfy")
    write_demo_data(tmp_path, count=2, test_count=0, size=96, seed=0, unpaired=True, style_pair="clahe",
                    source="real")
    for path in sorted(tmp_path.rglob("*.dcm")):
        result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"


def test_real_source_without_pydicom_data_is_a_one_line_error(tmp_path: Path, monkeypatch, capsys) -> None:
    import pydicom.data

    from dicom_node.demo.real_crops import load_real_sources

    monkeypatch.setattr(pydicom.data, "get_testdata_file", lambda *a, **k: None)
    load_real_sources.cache_clear()
    try:
        assert main(["demo-data", str(tmp_path / "x"), "--source", "real", "--unpaired", "--style-pair",
                     "clahe", "--size", "64"]) == 1
    finally:
        load_real_sources.cache_clear()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pydicom-data" in err[0]
    assert not (tmp_path / "x").exists()


def test_unknown_source_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--source"):
        write_demo_data(tmp_path / "x", count=1, test_count=0, size=64, source="scanner")

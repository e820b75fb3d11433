"""demo-data's nonlinear vendor styles (multiscale, CLAHE, bilateral, limited unsharp) and
crops of the real pydicom-data radiographs (``--source real``)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
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
from dicom_node.demo.phantoms import gaussian_blur, make_phantom, render, smooth_noise
from dicom_node.demo.vendor_processing import STYLE_PAIRS, process, to_stored
from dicom_node.demo.writer import write_demo_data
from dicom_node.errors import UserError
from tests.test_demo_data import _ds

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

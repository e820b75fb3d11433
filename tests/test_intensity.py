"""Intensities that keep their meaning: fixed per-domain windows (engine/radiograph.py,
train/intensity.py).

A vendor's style maps absolute values, so a fixed-window model must read the same values the
same way whatever the image shows (a crop, another bit depth, MONOCHROME1, a rescale), write
its output in the target domain's values with a window that shows them, and leave model files
written before (per-image percentiles) translating exactly as they did.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from factory import make_dataset, phantom

from dicom_node.engine import load_style_model, new_style_model, save_style_model
from dicom_node.engine.fidelity import assess
from dicom_node.engine.pipeline import translate_radiograph
from dicom_node.engine.pixels import (
    FULL_RANGE,
    OUTPUT_MAX,
    Radiograph,
    decode_dataset,
    normalize,
    output_scale,
    rewindow,
    to_output_pixels,
)
from dicom_node.engine.tiling import translate_with_base
from dicom_node.train.intensity import pooled_percentiles

WINDOW_A = {"method": "fixed", "low": 400.0, "high": 3600.0}


def _model(tmp_path, name, *, normalization=None, output=None, seed=1):
    gen = new_style_model(ngf=4, n_blocks=1, residual=True, seed=seed)
    last = [m for m in gen.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.normal_(0.0, 0.002, generator=torch.Generator().manual_seed(seed))
    path = tmp_path / f"{name}.safetensors"
    save_style_model(gen, path, name=name, normalization=normalization, output=output)
    return load_style_model(path)


def test_pooled_percentiles_of_sketches_equal_the_percentiles_of_all_pixels():
    from dicom_node.train.intensity import SKETCH_POINTS

    rng = np.random.default_rng(0)
    images = [rng.normal(1000, 200, 40_000), rng.normal(3000, 400, 90_000), rng.uniform(0, 4095, 10_000)]
    sketches = [{"count": x.size, "quantiles": np.quantile(x, np.linspace(0, 1, SKETCH_POINTS)).tolist()}
                for x in images]
    got = pooled_percentiles(sketches, (0.5, 50, 99.5))
    want = np.percentile(np.concatenate(images), (0.5, 50, 99.5))
    # a bigger image weighs more: the pooled median lies nearer the second image's
    np.testing.assert_allclose(got, want, rtol=0, atol=0.01 * (want[2] - want[0]))


def test_a_crop_reads_the_same_values_as_the_whole_image_through_a_fixed_window():
    """The point of a fixed window: per-image percentiles move with the content, this does not."""
    whole = phantom(256, 256, 12, seed=3).astype(np.float32)
    crop = whole[40:140, 100:220]
    fixed = [normalize(Radiograph(pixels=img), WINDOW_A) for img in (whole, crop)]
    np.testing.assert_array_equal(fixed[0][40:140, 100:220], fixed[1])
    per_image = [normalize(Radiograph(pixels=img)) for img in (whole, crop)]
    assert np.abs(per_image[0][40:140, 100:220] - per_image[1]).mean() > 0.05  # what the old rule did


@pytest.mark.parametrize("variant", ["monochrome1", "15-bit rescaled", "10-bit rescaled"])
def test_encodings_of_the_same_values_give_the_same_model_input(variant):
    """BitsStored, Rescale Slope/Intercept and MONOCHROME1 handled by the one rule: modality-LUT
    values in MONOCHROME2 polarity.  A 12-bit image and its twins reach the model identically."""
    pix = phantom(96, 80, 12, seed=5)
    x12 = normalize(decode_dataset(make_dataset(pix, bits_stored=12)), WINDOW_A)
    if variant == "monochrome1":
        ds = make_dataset((4095 - pix).astype(np.uint16), bits_stored=12, photometric="MONOCHROME1")
    elif variant == "15-bit rescaled":  # finer steps of the same values: stored = 8 x value
        ds = make_dataset((pix.astype(np.uint32) * 8).astype(np.uint16), bits_stored=15)
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "0.125", "0", "US"
    else:  # coarser detector, values = 4 x stored + 100 (only values that 10 bits can hold)
        stored = (pix // 4).astype(np.uint16)
        pix = stored.astype(np.float32) * 4 + 100
        x12 = normalize(Radiograph(pixels=pix), WINDOW_A)
        ds = make_dataset(stored, bits_stored=10)
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "4", "100", "US"
    np.testing.assert_allclose(normalize(decode_dataset(ds), WINDOW_A), x12, atol=1e-6)


def test_model_files_written_before_translate_exactly_as_they_did(tmp_path):
    """A percentile model (every file written so far): same model input, same pixels, no
    Rescale, the full-range window; computed here with the old formula, step by step."""
    model = _model(tmp_path, "old")
    assert model.normalization["method"] == "percentile" and "output" not in model.metadata
    assert output_scale(model.metadata.get("output")) == FULL_RANGE
    ds = make_dataset(phantom(128, 112, 12, seed=2))
    img = decode_dataset(ds)
    result = translate_radiograph(model, ds, img, tile=0, guard=False)
    lo, hi = np.percentile(img.pixels, [0.5, 99.5])
    x = np.clip((img.pixels.astype(np.float32) - np.float32(lo)) * np.float32(2.0 / (hi - lo)) - 1, -1, 1)
    np.testing.assert_array_equal(result.model_input, x)
    y, _ = translate_with_base(model, x, tile=0)
    old = np.clip(y, -1.0, 1.0) + np.float32(1.0)
    old *= np.float32(OUTPUT_MAX / 2.0)
    np.testing.assert_array_equal(result.sc.pixel_array, np.rint(old).astype(np.uint16))
    assert "RescaleSlope" not in result.sc and "RescaleIntercept" not in result.sc
    assert (float(result.sc.WindowCenter), float(result.sc.WindowWidth)) == (32768.0, 65536.0)


@pytest.mark.parametrize("window, rescaled", [((300.0, 3800.0), False), ((-1000.0, 70000.0), True)])
def test_outputs_are_written_in_the_target_domains_values(tmp_path, window, rescaled):
    """Output values = domain B's (stored as they are when they fit 16 bits, else through
    Rescale Slope/Intercept), shown with B's window; dciodvfy accepts both."""
    from test_secondary_capture import dciodvfy_errors

    low, high = window
    model = _model(tmp_path, "fixed", normalization=WINDOW_A,
                   output={"normalization": {"method": "fixed", "low": low, "high": high}})
    ds = make_dataset(phantom(128, 112, 12, seed=4))
    result = translate_radiograph(model, ds, decode_dataset(ds), tile=0, guard=False)
    sc = result.sc
    values = sc.pixel_array.astype(np.float64)
    if rescaled:
        values = values * float(sc.RescaleSlope) + float(sc.RescaleIntercept)
        assert sc.RescaleType == "US"
    else:
        assert "RescaleSlope" not in sc
    want = low + (np.clip(result.model_output, -1, 1).astype(np.float64) + 1) / 2 * (high - low)
    step = (high - low) / OUTPUT_MAX if rescaled else 1.0
    assert np.abs(values - want).max() <= 0.51 * step + 1e-6 * (high - low)
    assert low - step <= values.min() and values.max() <= high + step
    center, width = float(sc.WindowCenter), float(sc.WindowWidth)
    assert abs((center - 0.5 - (width - 1) / 2) - low) < 0.1 and abs((center - 0.5 + (width - 1) / 2) - high) < 0.1
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []


def test_to_output_pixels_round_trips_a_target_window():
    scale = output_scale({"normalization": {"method": "fixed", "low": 300.0, "high": 3800.0}})
    y = np.linspace(-1, 1, 3501, dtype=np.float32)
    np.testing.assert_array_equal(to_output_pixels(y, scale), np.arange(300, 3801))


def test_rewindow_keeps_the_values_and_leaves_per_image_windows_alone():
    b = {"method": "fixed", "low": 0.0, "high": 8000.0}
    x = np.array([-1.0, 0.0, 1.0], dtype=np.float32)  # 400, 2000, 3600 in A's window
    np.testing.assert_allclose(rewindow(x, WINDOW_A, b), [-0.9, -0.5, -0.1], atol=1e-6)
    per_image = {"method": "percentile", "low": 0.5, "high": 99.5}
    np.testing.assert_array_equal(rewindow(x, per_image, b), x)


def test_the_guard_reports_an_input_far_outside_the_models_window(tmp_path):
    """Another exposure or detector: its values are clipped on the way in, and the guard says so."""
    model = _model(tmp_path, "fixed", normalization=WINDOW_A)
    pix = phantom(256, 256, 12, seed=6).astype(np.float32)
    for pixels, flagged in ((pix, False), (pix * 2.0 + 1500, True)):
        x = normalize(Radiograph(pixels=pixels), model.normalization)
        y, base = translate_with_base(model, x, tile=0)
        report = assess(model, x, y, base=base)
        assert (report.scores["window"] > 20.0) is flagged, report.scores
        assert any("intensity window" in r for r in report.reasons) is flagged, report.reasons
    old = _model(tmp_path, "old")  # per-image windows clip by design: not judged
    x = normalize(Radiograph(pixels=pix * 2.0 + 1500), old.normalization)
    assert assess(old, x, translate_with_base(old, x, tile=0)[0]).scores["window"] is None


# ----------------------------------------------------------------------------- the trainer

def _train_data(root, n=3, size=96):
    """A: 12-bit DICOM phantoms; B: the same kind of anatomy 'processed' to 16-bit values
    (disjoint images, so unpaired)."""
    from factory import write

    for sub in ("A", "B"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write(make_dataset(phantom(size, size, 12, seed=i)), root / "A" / f"a{i}.dcm")
        b = (65535 * (phantom(size, size, 12, seed=10 + i) / 4095.0) ** 0.6).round().astype(np.uint16)
        write(make_dataset(b, bits_stored=16), root / "B" / f"b{i}.dcm")
    return root


def _train(tmp_path, data, steps, **data_keys):
    import yaml

    from dicom_node.cli import main

    cfg = {"data": {"a": str(data / "A"), "b": str(data / "B"), **data_keys},
           "model": {"ngf": 4, "n_blocks": 1, "ndf": 4},
           "train": {"patch_size": 64, "steps": steps, "pool_size": 2, "threads": 1},
           "output": {"dir": str(tmp_path / "run"), "sample_every": 100, "checkpoint_every": 2, "log_every": 2}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return main(["train", "--config", str(path), "--no-progress", *(["--resume"] if steps > 2 else [])])


def _pixels(folder):
    from dicom_node.engine.pixels import read_image_file

    return np.concatenate([read_image_file(f).pixels.ravel() for f in sorted(folder.iterdir())])


def test_the_trainer_records_each_domains_window_and_keeps_it_on_resume(tmp_path):
    data = _train_data(tmp_path / "data")
    assert _train(tmp_path, data, 2) == 0
    a2b, b2a = (load_style_model(tmp_path / "run" / "models" / f"run_{d}.safetensors") for d in ("A2B", "B2A"))
    windows = {}
    for label in ("A", "B"):
        lo, hi = np.percentile(_pixels(data / label), [0.5, 99.5])
        windows[label] = (lo, hi)
    for model, src, dst in ((a2b, "A", "B"), (b2a, "B", "A")):
        norm, out = model.normalization, model.metadata["output"]["normalization"]
        assert norm["method"] == out["method"] == "fixed"
        for got, (lo, hi) in ((norm, windows[src]), (out, windows[dst])):
            np.testing.assert_allclose([got["low"], got["high"]], [lo, hi], atol=0.01 * (hi - lo))
    # The node writes A->B outputs in B's values (16-bit here, stored as they are).
    ds = make_dataset(phantom(96, 96, 12, seed=7))
    sc = translate_radiograph(a2b, ds, decode_dataset(ds), tile=0, guard=False).sc
    b_lo, b_hi = a2b.metadata["output"]["normalization"]["low"], a2b.metadata["output"]["normalization"]["high"]
    assert "RescaleSlope" not in sc and b_lo - 1 <= sc.pixel_array.min() and sc.pixel_array.max() <= b_hi + 1
    assert sc.pixel_array.max() > 4095  # B's 16-bit range, not A's 12 bits
    # New images that would move the window (much brighter) do not move a resumed run's.
    from factory import write

    write(make_dataset(np.full((96, 96), 4095, np.uint16)), data / "A" / "bright.dcm")
    assert _train(tmp_path, data, 4) == 0
    resumed = load_style_model(tmp_path / "run" / "models" / "run_A2B.safetensors")
    assert resumed.normalization == a2b.normalization and resumed.metadata["provenance"]["steps"] == 4


def test_per_image_normalisation_stays_an_explicit_choice(tmp_path):
    data = _train_data(tmp_path / "data", n=2)
    assert _train(tmp_path, data, 2, normalization="image") == 0
    model = load_style_model(tmp_path / "run" / "models" / "run_A2B.safetensors")
    assert model.normalization == {"method": "percentile", "low": 0.5, "high": 99.5}
    assert "output" not in model.metadata


@pytest.mark.parametrize("normalization, output", [
    ({"method": "fixed", "low": 3600.0, "high": 400.0}, None),
    ({"method": "fixed", "low": "dark"}, None),
    (WINDOW_A, {"normalization": {"method": "fixed", "low": 100.0, "high": float("nan")}}),
])
def test_a_broken_window_is_refused_when_the_model_loads(tmp_path, normalization, output):
    from dicom_node.engine.errors import UserError

    gen = new_style_model(ngf=4, n_blocks=1, residual=True)
    path = tmp_path / "broken.safetensors"
    save_style_model(gen, path, name="broken", normalization=normalization, output=output)
    with pytest.raises(UserError, match="invalid intensity window"):
        load_style_model(path)

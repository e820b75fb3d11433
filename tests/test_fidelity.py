"""The fidelity guard (engine.fidelity): good outputs pass, each injected fault class is flagged,
calibration, the inverse by weight digest, the SC marks, and ``translate``'s fidelity.jsonl.

Models and faults come from bench/fidelity_faults.py (the benchmark measures the rates on many
more images); here a small calibrated pair on 256 px demo phantoms.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pydicom
import pytest
import torch

from bench import fidelity_faults as ff
from dicom_node.cli import main
from dicom_node.engine import fidelity as fd
from dicom_node.engine import load_style_model, save_style_model
from dicom_node.engine.defaults import CAUTION_LABEL, FLAGGED_PREFIX
from dicom_node.engine.errors import UserError
from dicom_node.engine.pipeline import translate_radiograph
from dicom_node.engine.pixels import decode_dataset
from dicom_node.engine.secondary_capture import derived_uid, device_uid
from dicom_node.engine.tiling import translate, translate_with_base
from tests.peers import dciodvfy_errors

SIZE = 256  # at 128 px a "small nodule" (radius 1.5 %) is 2 px: below what any guard can see


@pytest.fixture(scope="module")
def kit():
    """A calibrated classic-style A->B model with its inverse, and held-out test images."""
    k = ff.calibrated_pair("classic", SIZE, images=18, calibration=12)
    chests = [i for i in ff.demo_images("classic", "a", range(ff.TEST, ff.TEST + 9), SIZE) if i.body_part == "CHEST"]
    return {"ab": k.ab, "ba": k.ba, "test": chests[:4], "train_a": k.train_a, "train_b": k.train_b,
            "calib_a": k.calibration_a, "other": ff.demo_images("classic", "b", range(ff.OTHER, ff.OTHER + 3), SIZE)}


def _report(model, x, inverse=None):
    with torch.no_grad():
        return fd.assess(model, x, translate(model, x, tile=0), inverse=inverse)


def test_good_outputs_pass_with_every_score(kit):
    for img in kit["test"]:
        report = _report(kit["ab"], img.x, kit["ba"])
        assert report.verdict == "ok", report.reasons
        assert report.calibrated and set(report.thresholds) == set(fd.SCORES)
        # every score but ``window``, which only fixed-window models have (tests/test_intensity.py)
        assert all(report.scores[k] is not None for k in fd.SCORES if k != "window")
        assert report.scores["window"] is None
        assert all(report.scores[k] <= report.thresholds[k] for k in fd.SCORES if k != "window")


@pytest.mark.parametrize("fault", list(ff.MODEL_FAULTS))
def test_each_model_fault_is_flagged(kit, fault):
    _, make = ff.MODEL_FAULTS[fault]
    reports = [_report(make(kit["ab"], k), img.x, kit["ba"]) for k, img in enumerate(kit["test"])]
    flagged = [r for r in reports if r.flagged]
    # every fault on every image (bench/fidelity.py measures the rates on many more images);
    # painted and erased structure is what the network added beyond the model's global stage
    assert len(flagged) == len(reports), [r.scores for r in reports]
    network = "the network changed a region"
    expected = {"paints a nodule": network, "paints a small nodule": network, "erases an edge": network,
                "erases a larger region": network, "corrupted weights": "not explained",
                "untrained non-residual": "not explained", "inverted polarity": "not explained"}[fault]
    assert all(any(expected in reason for reason in r.reasons) for r in flagged)


@pytest.mark.parametrize("fault", list(ff.INPUT_FAULTS) + ["other vendor", "knee model on chests"])
def test_inputs_unlike_the_training_data_are_flagged(kit, fault):
    model = kit["ab"]
    if fault == "other vendor":
        inputs = [i.x for i in kit["other"]]
    elif fault == "knee model on chests":
        knees_a = [i.x for i in kit["train_a"] if i.body_part == "KNEE"]
        knees_b = [i.x for i in kit["train_b"] if i.body_part == "KNEE"]
        held = [i.x for i in kit["calib_a"] if i.body_part == "KNEE"]
        model = ff.calibrate(ff.tone_model(knees_a, knees_b, "knee"), None, knees_a, held)
        inputs = [i.x for i in kit["test"]]
    else:
        inputs = [ff.INPUT_FAULTS[fault][1](i.x, k) for k, i in enumerate(kit["test"])]
    reports = [_report(model, x) for x in inputs]
    flagged = [r for r in reports if r.flagged]
    need = len(reports) - 1 if fault == "metal implants" else len(reports)  # bench: the rate
    assert len(flagged) >= need, [r.scores for r in reports]
    expected = {"metal implants": "saturated regions unlike the training data",
                "other detector": "input noise unlike the training data"}.get(fault, "input unlike the training data")
    assert any(expected in reason for r in flagged for reason in r.reasons), [r.reasons for r in flagged]


def test_the_network_score_learns_what_a_network_normally_adds_and_flags_painting(kit):
    """A good model whose network adds texture of its own (random last-layer weights: about ten
    times the fine texture a trained one adds, bench/fidelity.py): calibrated, its held-out outputs pass; a nodule painted, or an edge erased, by
    that network is flagged on every image.  Without calibration nothing is judged."""
    gen = copy.deepcopy(kit["ab"].generator)
    last = [m for m in gen.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.copy_(torch.randn(last.weight.shape, generator=torch.Generator().manual_seed(3)) * 0.005)
    textured = ff.calibrate(ff.wrapped(kit["ab"], gen, "textured"), kit["ba"], [i.x for i in kit["train_a"]],
                            [i.x for i in kit["calib_a"]])
    scale = textured.metadata["fidelity"]["network_scale"]
    assert len(scale) == 2 * fd.LEVELS + 1 and max(scale[:fd.LEVELS + 1]) > 10 * fd.NETWORK_FLOOR  # it adds
    assert textured.metadata["fidelity"]["thresholds"]["network"] == pytest.approx(1.5)
    for k, img in enumerate(kit["test"]):
        good = _report(textured, img.x, kit["ba"])
        assert good.verdict == "ok", good.reasons
        assert 0.3 < good.scores["network"] <= 1.5
        for fault in (ff.Painter(gen, radius=0.015, seed=k), ff.Eraser(gen)):
            bad = _report(ff.wrapped(textured, fault, "faulty"), img.x, kit["ba"])
            assert any("the network changed a region" in r for r in bad.reasons), (type(fault), bad.scores)
    legacy = ff.wrapped(textured, ff.Painter(gen, seed=0), "legacy")
    del legacy.metadata["fidelity"]["network_scale"]
    assert _report(legacy, kit["test"][0].x).scores["network"] is None


def test_the_structure_prediction_follows_an_output_curve_that_clips_sharpening(kit):
    """A style that sharpens hard (band gains 4) and whose output curve flattens the darkest
    fifth of the range: its undershoots along edges clip to black.  The structure prediction
    has an output curve of its own (after the band gains, as engine.tone_filter), so the
    clipped undershoots are explained (~0.25-0.3; ~0.45-0.6 without it)."""
    model = ff.wrapped(kit["ab"], copy.deepcopy(kit["ab"].generator), "clipping")
    stage = model.generator.tone_filter
    with torch.no_grad():
        stage.gains[:4] = 4.0
        stage.tone_out.copy_(torch.linspace(-1, 1, stage.knots).clamp_min(-0.6))
    for img in kit["test"][:2]:
        with torch.no_grad():
            y = np.clip(translate(model, img.x, tile=0), -1, 1)
        assert (y <= -0.6 + 1e-6).mean() > 0.05  # clipped black, much of it undershoot
        scores = fd.structure_scores(fd.analysis_view(img.x), fd.analysis_view(y))
        assert scores["structure"] < 0.35 and scores["band_structure"] < 0.35, scores


class Sharpener(torch.nn.Module):
    """A good model's network that sharpens strongly (adds ``strength`` times the fine detail of
    the global stage's output, as a trained edge-enhancing style does)."""

    def __init__(self, inner: torch.nn.Module, strength: float = 2.0) -> None:
        super().__init__()
        self.inner, self.strength = inner, strength
        self.tone_filter = inner.tone_filter  # the network's addition is judged beyond it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from dicom_node.engine.tone_filter import gaussian_blur

        y = self.inner(x)
        return y + self.strength * (y - gaussian_blur(y, 1.5))


def test_an_edge_erased_by_a_sharpening_network_is_flagged_by_its_sign(kit):
    """A network whose normal edge enhancement is stronger than an erased edge's change: by
    size alone (RMS per band, blob) the erasure is within calibration; by sign (the share of
    the global stage's structure taken away) it is several times beyond it, and flagged.  A
    calibration from before that component (LEVELS + 1 values) judges only what it has."""
    gen = Sharpener(kit["ab"].generator)
    sharp = ff.calibrate(ff.wrapped(kit["ab"], gen, "sharp"), kit["ba"], [i.x for i in kit["train_a"]],
                         [i.x for i in kit["calib_a"]])
    scale = sharp.metadata["fidelity"]["network_scale"]
    size = fd.LEVELS + 1  # the RMS and blob components come first
    for k, img in enumerate(kit["test"]):
        assert _report(sharp, img.x, kit["ba"]).verdict == "ok"
        eraser = ff.wrapped(sharp, ff.Eraser(gen), "eraser")
        with torch.no_grad():
            y, base = translate_with_base(eraser, img.x, tile=0)
        levels = fd.network_levels(fd.analysis_view(fd.network_addition(y, base)),
                                   fd.analysis_view(np.clip(base, -1, 1)), fd.analysis_view(img.x))
        assert fd.network_score(levels[:size], scale[:size]) < 1.5  # its size is a normal one
        assert fd.network_score(levels, scale) > 3.0
        report = fd.assess(eraser, img.x, y, base=base)
        assert any("the network changed a region" in r for r in report.reasons), report.scores
        legacy = ff.wrapped(sharp, ff.Eraser(gen), "legacy")
        legacy.metadata["fidelity"]["network_scale"] = scale[:size]
        assert fd.assess(legacy, img.x, y, base=base).scores["network"] < 1.5


def test_a_calibration_is_only_valid_for_the_weights_it_measured(kit):
    """Weights changed after calibration (here: slightly, so every image score still passes)
    flag every output; a calibration that does not name its weights (older files) is trusted."""
    x = kit["test"][0].x
    changed = ff.corrupted(kit["ab"], strength=0.01)  # a new, consistent file digest
    report = _report(changed, x)
    assert report.flagged and report.reasons[-1] == fd.STALE_CALIBRATION
    assert all(report.scores[k] <= report.thresholds[k] for k in ("structure", "unexplained", "ood"))
    legacy = ff.wrapped(changed, changed.generator, "legacy")
    del legacy.metadata["fidelity"]["weights_sha256"]
    assert fd.STALE_CALIBRATION not in _report(legacy, x).reasons
    assert fd.STALE_CALIBRATION not in _report(kit["ab"], x).reasons


def test_translate_keeps_the_global_stage_for_the_guard(kit, tiny_model):
    """``translate_with_base``: the same output as ``translate``, and the tone filter's output
    (whole pass and tiled executor alike), or the input for a model without one."""
    x = kit["test"][0].x
    for tile in (0, 96):
        y, base = translate_with_base(kit["ab"], x, tile=tile)
        assert np.array_equal(y, translate(kit["ab"], x, tile=tile))
        with torch.no_grad():
            expected = kit["ab"].generator.tone_filter(torch.from_numpy(x)[None, None])[0, 0].numpy()
        assert np.abs(base - expected).max() < 1e-4
        assert np.abs(fd.base_of(kit["ab"], x) - expected).max() < 1e-6
    y, base = translate_with_base(tiny_model, x[:64, :80], tile=0)
    assert np.array_equal(base, x[:64, :80]) and y.shape == base.shape


def test_noise_and_saturation_statistics():
    rng = np.random.default_rng(0)
    ramp = np.tile(np.linspace(-0.8, 0.8, 256, dtype=np.float32), (256, 1))
    for sigma in (0.005, 0.02, 0.08):  # the estimate follows the noise, not the ramp's (or an edge's) detail
        noisy = ramp + rng.normal(0, sigma, ramp.shape).astype(np.float32)
        noisy[:, 128:] += 0.5 * (noisy[:, 128:] > -2)  # a strong edge barely moves the median
        assert fd.noise_level(np.clip(noisy, -1.0, 1.0)) == pytest.approx(sigma, rel=0.15)  # clipped: not counted
    assert fd.noise_score(0.02, [0.01, 0.04]) == pytest.approx(1.0)  # an octave from the nearest
    # Saturation: a soft climb into white (as the domain shows it) sets the level; a block of
    # saturated white dropped into grey tissue is a steeper step and counts, the soft one not.
    soft = np.clip(np.tile(np.linspace(0.0, 1.5, 256, dtype=np.float32), (256, 1)), -1, 1)
    level = fd.saturated_level([soft])
    assert 0.8 < level < fd.CLIPPED
    assert fd.saturated_score(soft, level) == 0.0
    metal = soft.copy()
    metal[100:120, 20:30] = 1.0  # 200 px in grey at ~0.1: its rim is the step that counts
    rim = 100 * (200 - 16 * 6) / metal.size  # the block's pixels within 2 px of the grey around it
    assert rim <= fd.saturated_score(metal, level) <= 100 * 200 / metal.size
    assert fd.saturated_level([np.zeros((64, 64), np.float32)]) == fd.CLIPPED  # none in the domain: any edge counts
    # Metal over bright tissue: grey 0.7 on every side of the plateau counts in full.
    bright = np.full((256, 256), 0.7, np.float32)
    bright[100:120, 100:110] = 1.0
    assert fd.saturated_score(bright, level) == pytest.approx(rim)  # the block's pixels within 2 px of grey


def test_models_calibrated_before_the_input_checks_skip_them(kit):
    """Older model files have no noise levels or saturation level: those scores are None and not judged."""
    old = kit["ab"].metadata["fidelity"]
    legacy = dict(old, domain=[{k: v for k, v in d.items() if k != "noise"} for d in old["domain"]],
                  thresholds={k: v for k, v in old["thresholds"].items() if k not in ("noise", "saturated")})
    legacy.pop("saturated_surround")
    legacy.pop("network_scale")
    model = ff.wrapped(kit["ab"], kit["ab"].generator, "legacy")
    model.metadata["fidelity"] = legacy
    x = ff.with_metal(kit["test"][0].x, 0)
    report = _report(model, x)
    assert report.scores["noise"] is None and report.scores["saturated"] is None and report.scores["network"] is None
    assert "noise" not in report.thresholds and "saturated" not in report.thresholds
    assert report.scores["ood"] is not None  # the style statistics still work
    new = _report(kit["ab"], x)
    assert new.scores["saturated"] > new.thresholds["saturated"]


def test_uncalibrated_models_use_the_documented_defaults(tiny_model):
    thresholds, calibrated = fd.thresholds_of(tiny_model)
    assert thresholds == fd.DEFAULT_THRESHOLDS and calibrated is False
    x = np.linspace(-1, 1, 96 * 80, dtype=np.float32).reshape(96, 80)
    report = fd.assess(tiny_model, x, x)
    assert report.verdict == "ok" and report.scores["ood"] is None and report.scores["cycle"] is None
    assert report.scores["noise"] is None and report.scores["saturated"] is None  # need a calibrated domain
    inverted = fd.assess(tiny_model, x, -x)
    assert inverted.flagged and any("not explained" in r for r in inverted.reasons)
    tiny = fd.assess(tiny_model, x[:10, :10], x[:10, :10])
    assert tiny.flagged and "too small" in tiny.reasons[0]


def test_calibration_is_the_highest_score_plus_a_margin():
    t = fd.calibrate_thresholds({"structure": [0.1, 0.2], "ood": [0.5, 2.0], "cycle": [], "unexplained": [None]})
    assert t == {"structure": pytest.approx(0.3), "ood": pytest.approx(4.0)}  # +0.1 abs; x2 rel


def test_weights_digest_names_the_network_and_a_damaged_file_is_refused(tmp_path, tiny_model_path):
    model = load_style_model(tiny_model_path)
    assert len(model.weights_sha256) == 64
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(tiny_model_path.read_bytes())
    assert load_style_model(copy).weights_sha256 == model.weights_sha256
    data = bytearray(copy.read_bytes())
    data[-9] ^= 0x40  # one bit of one weight
    copy.write_bytes(bytes(data))
    with pytest.raises(UserError, match="weights do not match their recorded digest"):
        load_style_model(copy)


def _source(img):
    ds = img.dataset
    return ds, decode_dataset(ds)


def test_flagged_output_goes_to_its_own_marked_series_and_passes_dciodvfy(kit, tmp_path):
    img = kit["test"][0]
    ds, rad = _source(img)
    bad = ff.MODEL_FAULTS["inverted polarity"][1](kit["ab"], 0)
    good = translate_radiograph(kit["ab"], ds, rad, tile=0, inverse=kit["ba"])
    flagged = translate_radiograph(bad, ds, rad, tile=0)
    recorded = translate_radiograph(bad, ds, rad, tile=0, show_flag=False, label=None)
    assert good.fidelity.verdict == "ok" and flagged.fidelity.flagged
    assert str(good.sc.ImageComments) == CAUTION_LABEL
    assert str(flagged.sc.SeriesDescription).startswith(FLAGGED_PREFIX)
    assert str(flagged.sc.SeriesInstanceUID) == derived_uid(str(ds.SeriesInstanceUID), bad.identity,
                                                             "fidelity-flagged")
    assert int(flagged.sc.SeriesNumber) == int(good.sc.SeriesNumber) + 1000
    assert "Fidelity guard: flagged: " in str(flagged.sc.ImageComments)
    assert str(flagged.sc.ImageComments).startswith(CAUTION_LABEL)
    assert not str(recorded.sc.SeriesDescription).startswith(FLAGGED_PREFIX) and "ImageComments" not in recorded.sc
    # provenance: one ContributingEquipmentSequence item for the model, its DeviceUID from the weights
    (item,) = [i for i in good.sc.ContributingEquipmentSequence if i.Manufacturer == "dicom-node"]
    assert item.DeviceUID == device_uid(kit["ab"]) == derived_uid("dicom-node style model weights",
                                                                  kit["ab"].weights_sha256)
    (other,) = [i for i in flagged.sc.ContributingEquipmentSequence if i.Manufacturer == "dicom-node"]
    assert item.DeviceUID != other.DeviceUID  # another network, another device
    assert "pair" not in item.ManufacturerModelName and item.SoftwareVersions and item.DeviceSerialNumber
    for name, result in (("good", good), ("flagged", flagged)):
        path = tmp_path / f"{name}.dcm"
        result.sc.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []


def test_a_body_part_the_model_never_saw_is_flagged_and_marked(kit):
    img = kit["test"][0]  # a chest
    ds, rad = _source(img)
    knees_only = copy.copy(kit["ab"])
    knees_only.metadata = {**kit["ab"].metadata, "direction": "A->B",
                           "provenance": {"data": {"A": {"body_parts": {"KNEE": 9, "unknown": 1}},
                                                   "B": {"body_parts": {"CHEST": 9}}}}}
    assert str(ds.BodyPartExamined) == "CHEST"
    seen = translate_radiograph(kit["ab"], ds, rad, tile=0, inverse=kit["ba"])
    unseen = translate_radiograph(knees_only, ds, rad, tile=0, inverse=kit["ba"])
    assert seen.fidelity.verdict == "ok"
    assert unseen.fidelity.flagged
    assert unseen.fidelity.reasons[-1] == "body part CHEST was not in the model's training data (KNEE)"
    assert "body part CHEST was not in" in str(unseen.sc.ImageComments)
    assert str(unseen.sc.SeriesDescription).startswith(FLAGGED_PREFIX)
    # the B->A model reads B's parts; an image that names no part, and a model that knows none, pass
    inverse_direction = copy.copy(knees_only)
    inverse_direction.metadata = {**knees_only.metadata, "direction": "B->A"}
    assert translate_radiograph(inverse_direction, ds, rad, tile=0, inverse=kit["ba"]).fidelity.verdict == "ok"
    unnamed = copy.deepcopy(ds)
    del unnamed.BodyPartExamined
    assert translate_radiograph(knees_only, unnamed, rad, tile=0, inverse=kit["ba"]).fidelity.verdict == "ok"
    # one part named in other words is one part: a THORAX through a model that saw CHEST passes,
    # a chest coded only in Anatomic Region Sequence is still a chest to a knees-only model
    chest_model = copy.copy(knees_only)
    chest_model.metadata = {**knees_only.metadata, "direction": "B->A"}
    thorax = copy.deepcopy(ds)
    thorax.BodyPartExamined = "THORAX"
    assert translate_radiograph(chest_model, thorax, rad, tile=0, inverse=kit["ba"]).fidelity.verdict == "ok"
    coded = copy.deepcopy(unnamed)
    region = pydicom.Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "T-D3000", "SRT", "Chest"
    coded.AnatomicRegionSequence = [region]
    assert translate_radiograph(knees_only, coded, rad, tile=0, inverse=kit["ba"]).fidelity.flagged


def test_translate_writes_fidelity_jsonl_finds_the_inverse_and_withholds(kit, tmp_path, capsys):
    models = tmp_path / "models"
    inverse = {"name": "pair_B2A", "weights_sha256": kit["ba"].weights_sha256}
    save_style_model(kit["ab"].generator, models / "pair_A2B.safetensors", name="pair_A2B", inverse=inverse,
                     fidelity=kit["ab"].metadata["fidelity"])
    save_style_model(kit["ba"].generator, models / "pair_B2A.safetensors", name="pair_B2A")
    save_style_model(ff.inverted(kit["ab"]).generator, models / "bad.safetensors", name="bad",
                     fidelity=kit["ab"].metadata["fidelity"])
    inputs = tmp_path / "in"
    inputs.mkdir()
    for k, img in enumerate(kit["test"][:2]):
        img.dataset.save_as(inputs / f"{k}.dcm", enforce_file_format=True)

    out = tmp_path / "out"
    assert main(["translate", "--model", str(models / "pair_A2B.safetensors"), "-o", str(out), "--preview",
                 str(inputs)]) == 0
    lines = [json.loads(line) for line in (out / "fidelity.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for line in lines:
        # the contract's keys (more may be added)
        assert {"source_sop_uid", "output_sop_uid", "model", "verdict", "reasons", "scores",
                "thresholds"} <= set(line)
        assert line["model"] == "pair_A2B" and line["verdict"] == "ok" and line["reasons"] == []
        assert line["scores"]["cycle"] is not None  # the inverse was found next to the model
        assert (out / f"{line['output_sop_uid']}.dcm").is_file()
        assert pydicom.dcmread(out / f"{line['output_sop_uid']}.dcm").SourceImageSequence[0]\
            .ReferencedSOPInstanceUID == line["source_sop_uid"]

    held = tmp_path / "held"
    assert main(["translate", "--model", str(models / "bad.safetensors"), "-o", str(held), "--preview",
                 "--fidelity", "withhold", str(inputs)]) == 0
    captured = capsys.readouterr()
    assert "2 flagged by the fidelity guard" in captured.out and "withheld" in captured.out
    assert "fidelity guard flagged the output (withheld)" in captured.err
    lines = [json.loads(line) for line in (held / "fidelity.jsonl").read_text().splitlines()]
    assert [line["verdict"] for line in lines] == ["flagged", "flagged"] and all(line["reasons"] for line in lines)
    assert list(held.glob("*.dcm")) == [] and len(list((held / "withheld").glob("*.dcm"))) == 2
    from PIL import Image

    png = next((held / "withheld").glob("*.png"))
    with Image.open(png) as im:
        assert tuple(np.asarray(im.convert("RGB"))[2, 2]) == (220, 30, 30)  # the red verdict banner


def test_the_guard_costs_little_next_to_a_translation(tiny_model):
    """Not a timing test (bench/fidelity.py measures): the guard works on a reduced copy, so its
    input is never larger than ANALYSIS_SIDE whatever the image size."""
    big = np.zeros((2048, 1536), np.float32)
    assert max(fd.analysis_view(big).shape) <= fd.ANALYSIS_SIDE
    assert fd.analysis_view(big).shape == (512, 384)

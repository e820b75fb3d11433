"""Pixel sizes: the header rule, the trainer's record and warning, and the guard's check.

A vendor's processing works at fixed sizes in pixels, so a model trained on 0.15 mm pixels
processes 0.10 mm ones at another scale (``engine/pixel_spacing.py``)."""
from __future__ import annotations

import json

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicom_node.engine import load_style_model
from dicom_node.engine.pixel_spacing import (
    SPACING_TOLERANCE,
    finer_domain,
    pixel_spacing_mm,
    spacing_range,
    trained_pixel_spacing,
    unlike_domains,
    unlike_pixel_spacing,
)
from dicom_node.engine.pixels import read_dicom
from tests.factory import PATIENT_ID, PATIENT_NAME, make_dataset, phantom, write
from tests.test_exam_mix import train_tiny


def _with(**spacings: object) -> Dataset:
    ds = Dataset()
    for keyword, value in spacings.items():
        setattr(ds, keyword, value)
    return ds


def test_the_pixel_size_is_the_detector_s_then_the_patient_plane_s_then_the_scanner_s():
    assert pixel_spacing_mm(_with(ImagerPixelSpacing=[0.148, 0.148], PixelSpacing=[0.13, 0.13])) == 0.148
    assert pixel_spacing_mm(_with(PixelSpacing=[0.1, 0.2])) == pytest.approx(0.15)  # the mean of row and column
    assert pixel_spacing_mm(_with(NominalScannedPixelSpacing=[0.3, 0.3])) == 0.3
    # a damaged or meaningless value is passed over (a real CR file has PixelSpacing 0)
    assert pixel_spacing_mm(_with(ImagerPixelSpacing=[0, 0], PixelSpacing=[0.1, 0.1])) == 0.1
    for odd in ([0.1], [-0.1, -0.1], [50, 50], None):
        assert pixel_spacing_mm(_with(PixelSpacing=odd)) is None, odd
    damaged = Dataset()  # as read from a file whose DS value is not a number
    damaged[0x00280030] = RawDataElement(Tag(0x00280030), "DS", 4, b"x\\y ", 0, True, True)
    assert pixel_spacing_mm(damaged) is None
    assert pixel_spacing_mm(Dataset()) is None


def test_an_input_is_judged_against_the_sizes_its_model_was_trained_on():
    assert spacing_range([0.1, None, 0.15, 0.12]) == {"min": 0.1, "median": 0.12, "max": 0.15}
    assert spacing_range([None, None]) is None
    model = {"direction": "A->B", "provenance": {"data": {"A": {"pixel_spacing_mm": spacing_range([0.14, 0.16])},
                                                          "B": {"pixel_spacing_mm": spacing_range([0.3])}}}}
    assert trained_pixel_spacing(model) == {"min": 0.14, "median": 0.15, "max": 0.16}
    for inside in (0.14, 0.15, 0.16, 0.14 / SPACING_TOLERANCE, 0.16 * SPACING_TOLERANCE, None):
        assert unlike_pixel_spacing(model, inside) is None, inside
    assert unlike_pixel_spacing(model, 0.1) == ("pixel size 0.100 mm is outside the model's training data "
                                                "(0.140 to 0.160 mm): it processes detail at another scale")
    assert "0.210 mm" in str(unlike_pixel_spacing(model, 0.21))
    assert unlike_pixel_spacing({**model, "direction": "B->A"}, 0.3) is None  # B->A reads B's sizes
    assert "(0.300 mm)" in str(unlike_pixel_spacing({**model, "direction": "B->A"}, 0.15))
    for odd in ({}, {"provenance": "x"}, {"provenance": {"data": {"A": {"pixel_spacing_mm": [0.1]}}}},
                {"provenance": {"data": {"A": {"pixel_spacing_mm": {"min": 0, "median": 0, "max": 0}}}}}):
        assert trained_pixel_spacing(odd) is None and unlike_pixel_spacing(odd, 0.5) is None
    # two domains differ when one's coarsest pixels are more than the tolerance finer than the other's finest
    assert unlike_domains(spacing_range([0.139]), spacing_range([0.148])) is None
    chests_and_knees = spacing_range([0.84] * 8 + [0.469] * 4), spacing_range([0.84] * 4 + [0.469] * 8)
    assert finer_domain(*chests_and_knees) is None and unlike_domains(*chests_and_knees) is None  # one mix of fields
    assert finer_domain(spacing_range([0.15, 0.16]), spacing_range([0.1, 0.11])) == "B"
    assert finer_domain(spacing_range([0.1]), spacing_range([0.15])) == "A"
    assert unlike_domains(spacing_range([0.1]), None) is None
    assert "(A 0.100 mm, B 0.150 mm, 1.50x)" in str(unlike_domains(spacing_range([0.1]), spacing_range([0.15])))


def test_dicom_node_train_records_the_pixel_sizes_warns_when_they_differ_and_the_guard_judges_by_them(
        tmp_path, caplog, capsys):
    from dicom_node.cli import main
    from dicom_node.engine.pipeline import translate_radiograph

    for domain, spacing in (("A", 0.15), ("B", 0.3)):
        (tmp_path / domain).mkdir()
        for i in range(3):
            ds = make_dataset(phantom(64, 64, seed=i + (10 if domain == "B" else 0)), seed=i)
            ds.ImagerPixelSpacing = ds.PixelSpacing = [spacing, spacing]
            write(ds, tmp_path / domain / f"{domain.lower()}{i}.dcm")
    said = train_tiny(tmp_path, caplog, "--set", "data.pixel_spacing=keep")  # the default interpolates B (below)
    warned = [m for m in said if m.startswith("the domains' pixels differ in size")]
    assert len(warned) == 1 and "(A 0.150 mm, B 0.300 mm, 2.00x)" in warned[0], said
    assert not any(PATIENT_NAME in m or PATIENT_ID in m for m in said)
    model = load_style_model(tmp_path / "run" / "models" / "run_A2B.safetensors")
    data = model.metadata["provenance"]["data"]
    assert data["A"]["pixel_spacing_mm"] == {"min": 0.15, "median": 0.15, "max": 0.15}
    assert data["B"]["pixel_spacing_mm"] == {"min": 0.3, "median": 0.3, "max": 0.3}
    capsys.readouterr()
    assert main(["model", "info", "--json", str(model.path)]) == 0
    assert json.loads(capsys.readouterr().out)["trained_pixel_spacing_mm"]["median"] == 0.15
    # the guard: an input of A's size is not judged by it, one of 0.10 mm is flagged with the reason
    source, rad = read_dicom(tmp_path / "A" / "a0.dcm")
    alike = translate_radiograph(model, source, rad, tile=0)
    assert not any("pixel size" in r for r in alike.fidelity.reasons)
    finer = source.copy()
    finer.ImagerPixelSpacing = finer.PixelSpacing = [0.1, 0.1]
    flagged = translate_radiograph(model, finer, rad, tile=0)
    assert flagged.fidelity.flagged
    assert "pixel size 0.100 mm is outside the model's training data (0.150 mm)" in flagged.fidelity.reasons[-1]
    assert "pixel size 0.100 mm is outside" in str(flagged.sc.ImageComments)


def test_finer_pixels_are_averaged_coarser_ones_interpolated_and_alike_ones_left_alone():
    import numpy as np

    from dicom_node.train.pixel_pitch import AVERAGED, INTERPOLATED, left_alone, resampling, to_pixel_size

    assert resampling(0.1, 0.15) == AVERAGED and resampling(0.2, 0.15) == INTERPOLATED
    for alike in ((0.13, 0.15), (0.18, 0.15), (None, 0.15), (0.1, None)):  # within 1.25x, or unknown
        assert resampling(*alike) is None, alike
    # a header more than 4x off is more likely wrong than a detector; nor past the decoder's limit
    assert resampling(0.6, 0.15) == INTERPOLATED and resampling(0.61, 0.15) is None
    assert resampling(0.0375, 0.15) == AVERAGED and resampling(0.037, 0.15) is None
    assert resampling(0.3, 0.15, (4096, 4096)) == INTERPOLATED and resampling(0.3, 0.15, (4097, 4096)) is None
    assert resampling(0.075, 0.15, (9000, 9000)) == AVERAGED
    assert left_alone([0.15, 0.16, None, 0.61, 0.03], 0.15) == [0.61, 0.03]  # as loaded: resampled ones are 0.15
    rng = np.random.default_rng(0)
    image = rng.normal(size=(96, 120)).astype(np.float32)
    valid = np.ones_like(image, bool)
    valid[:, :3] = False  # a padded edge
    out, mask = to_pixel_size(image, valid, 0.1, 0.15)
    assert out.shape == mask.shape == (64, 80)
    assert out.mean() == pytest.approx(image.mean(), abs=0.03) and out.std() < 0.75 * image.std()  # averaged
    assert image.min() <= out.min() and out.max() <= image.max()
    assert not mask[:, :4].any() and mask[:, 4:].all()  # valid where every pixel the kernel reads (±3) was
    assert to_pixel_size(image, None, 0.1, 0.2)[1] is None
    # to finer pixels: bicubic, within the image's own range; valid where the source around it all was
    out, mask = to_pixel_size(image, valid, 0.15, 0.1)
    assert out.shape == mask.shape == (144, 180) and image.min() <= out.min() and out.max() <= image.max()
    assert not mask[:, :7].any() and mask[:, 12:-4].all() and mask[4:-4, 12:].all()
    ramp = np.tile(np.linspace(-1, 1, 120, dtype=np.float32), (96, 1))
    up, _ = to_pixel_size(ramp, None, 0.15, 0.1)
    assert np.abs(up[:, 8:-8] - np.linspace(-1, 1, 180)[None, 8:-8]).max() < 0.01  # a ramp stays a ramp
    assert to_pixel_size(image, None, 0.2, 0.1)[1] is None


def test_domain_b_of_finer_pixels_is_loaded_at_a_s_pixel_size_and_cached_as_such(tmp_path):
    from PIL import Image

    from dicom_node.engine.pixels import DEFAULT_NORMALIZATION
    from dicom_node.train.data import load_domain

    folder = tmp_path / "B"
    folder.mkdir()
    for name, spacing in (("fine", 0.075), ("alike", 0.14), ("none", None)):
        ds = make_dataset(phantom(128, 128), rows=128, cols=128)
        if spacing is None:
            del ds.ImagerPixelSpacing, ds.PixelSpacing
        else:
            ds.ImagerPixelSpacing = ds.PixelSpacing = [spacing, spacing]
        write(ds, folder / f"{name}.dcm")
    Image.fromarray(phantom(128, 128, bits=8).astype("uint8")).save(folder / "png.png")
    norm = dict(DEFAULT_NORMALIZATION)
    for _ in range(2):  # decoded, then from the cache
        b = load_domain(folder, "B", tmp_path / "cache", norm, pitch_to=0.15)
        assert b.names == ["alike", "fine", "none", "png"]
        assert [x.shape for x in b.arrays] == [(128, 128), (64, 64), (128, 128), (128, 128)]
        assert b.pixel_spacings == [0.14, 0.15, None, None] and b.resampled == {"averaged": 1}
        assert b.content[1].shape == (8, 8)  # the content map of the averaged image
    kept = load_domain(folder, "B", tmp_path / "cache", norm)  # another pixel size to average to: decoded again
    assert kept.arrays[1].shape == (128, 128) and kept.pixel_spacings[1] == 0.075 and not kept.resampled
    # the trainer resamples B only where its pixels and A's do not overlap, read from the headers alone
    from dicom_node.train.pixel_pitch import pitch_target

    files = sorted(folder.iterdir())
    assert pitch_target(spacing_range([0.15, 0.16, 0.17]), files) is None  # B's 0.14 overlaps A's 0.15
    files = [f for f in files if f.name != "alike.dcm"]
    assert pitch_target(spacing_range([0.15, 0.16, 0.17]), files) == 0.16  # A's median
    assert pitch_target(spacing_range([0.03, 0.04]), files) == 0.035  # B coarser: A's median too
    assert pitch_target(None, files) is None and pitch_target(spacing_range([0.07, 0.08]), files) is None


@pytest.mark.parametrize(("spacing", "how", "size"), [(0.075, "averaged to A's pixel size, 0.150 mm, from finer", 48),
                                                     (0.3, "interpolated to A's pixel size, 0.150 mm, from coarser", 192)])
def test_dicom_node_train_resamples_b_to_a_s_pixel_size_unless_told_to_keep_it(tmp_path, caplog, spacing, how, size):
    from dicom_node.train.data import load_domain

    for domain, mm in (("A", 0.15), ("B", spacing)):
        (tmp_path / domain).mkdir()
        for i in range(3):
            ds = make_dataset(phantom(96, 96, seed=i + (10 if domain == "B" else 0)), rows=96, cols=96, seed=i)
            ds.ImagerPixelSpacing = ds.PixelSpacing = [mm, mm]
            write(ds, tmp_path / domain / f"{domain.lower()}{i}.dcm")
    if spacing > 0.15:  # and one whose header is off by far more than a detector: left alone, with a warning
        ds.ImagerPixelSpacing = ds.PixelSpacing = [5.0, 5.0]
        write(ds, tmp_path / "B" / "b9.dcm")
    said = train_tiny(tmp_path, caplog)
    total = 3 if spacing < 0.15 else 4
    assert f"domain B: 3 of {total} images {how} pixels (a vendor's processing " \
           "works in pixels; data.pixel_spacing: keep leaves them)" in said
    far = [m for m in said if "left at their own pixel size" in m]
    assert far == ([] if total == 3 else ["domain B: 1 of 4 images left at their own pixel size (5.000 to 5.000 mm): "
                                          "more than 4x from A's 0.150 mm or too large to interpolate; check their "
                                          "headers"])
    assert not any(m.startswith("the domains' pixels differ") for m in said)
    data = load_style_model(tmp_path / "run" / "models" / "run_A2B.safetensors").metadata["provenance"]["data"]
    assert data["B"]["pixel_spacing_mm"]["median"] == 0.15
    assert data["B"]["resampled_to_pixel_spacing"] == {how.split()[0]: 3} and "resampled_to_pixel_spacing" not in data["A"]
    norm = json.loads((tmp_path / "run" / "cache" / "B" / "index.json").read_text())["normalization"]
    cached = load_domain(tmp_path / "B", "B", tmp_path / "run" / "cache", norm, pitch_to=0.15, write_cache=False)
    assert [x.shape for x in cached.arrays] == [(size, size)] * 3 + [(96, 96)] * (total - 3)  # as the run trained
    if spacing < 0.15:  # keep: as it is, with the warning (the coarser B's is the test above)
        said = train_tiny(tmp_path, caplog, "-o", str(tmp_path / "kept"), "--set", "data.pixel_spacing=keep")
        assert not any("to A's pixel size" in m for m in said)
        assert any(m.startswith("the domains' pixels differ in size (A 0.150 mm, B 0.075 mm, 2.00x)") for m in said)

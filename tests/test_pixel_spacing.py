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
    # two domains differ when their medians do by more than the tolerance
    assert unlike_domains(spacing_range([0.139]), spacing_range([0.148])) is None
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
    said = train_tiny(tmp_path, caplog)
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

"""Real CR radiographs (pydicom's public test images, the pydicom-data package of the test
extra; nothing is downloaded and no image is kept in this repository): a Philips CR chest
(RG1, 1955 x 1841, 15 bit, MONOCHROME1) and a Fuji CR leg (RG3, 1760 x 1760, 10 bit), each
uncompressed, JPEG 2000 lossless and JPEG 2000 lossy as the modality's archive wrote them.

What synthetic phantoms cannot show: that real encodings decode to the same pixels, that a real
file with a vendor's attributes becomes a valid Secondary Capture, and that the fidelity guard
neither flags real anatomy and noise nor misses faults painted into them.
"""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from bench import fidelity_faults as ff
from dicom_node.cli import main
from dicom_node.engine import fidelity as fd
from dicom_node.engine.pixels import read_dicom
from dicom_node.engine.tiling import translate_with_base
from tests.peers import dciodvfy_errors


def real(name: str):
    path = get_testdata_file(name, download=False)
    assert path, f"{name}: the pydicom-data package (test extra) is not installed"
    return path


@pytest.mark.parametrize("image", ["RG1", "RG3"])
def test_real_jpeg2000_decodes_to_the_uncompressed_pixels(image):
    _, plain = read_dicom(real(f"{image}_UNCR.dcm"))
    _, lossless = read_dicom(real(f"{image}_J2KR.dcm"))
    _, lossy = read_dicom(real(f"{image}_J2KI.dcm"))
    assert plain.pixels.shape == lossless.pixels.shape == lossy.pixels.shape
    assert np.array_equal(plain.pixels, lossless.pixels)
    span = float(np.ptp(plain.pixels))
    rmse = float(np.sqrt(np.mean((lossy.pixels.astype(np.float64) - plain.pixels) ** 2)))
    assert 0 < rmse < 0.02 * span  # lossy: close, not equal


def test_a_real_jpeg2000_chest_becomes_a_valid_secondary_capture(tmp_path, tiny_model_path):
    src = real("RG1_J2KR.dcm")
    out = tmp_path / "out"
    assert main(["translate", "--model", str(tiny_model_path), "-o", str(out), src]) == 0
    (sc,) = sorted(out.glob("*.dcm"))
    ds = pydicom.dcmread(sc)
    source = pydicom.dcmread(src, stop_before_pixels=True)
    assert (ds.Rows, ds.Columns) == (source.Rows, source.Columns)
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert dciodvfy_errors(sc) == []


@pytest.fixture(scope="module")
def chest_kit():
    """A tone-filter pair between the real chest as it is and re-processed in another vendor's
    style, fitted and calibrated from crops of the chest's left half (bench/fidelity_faults)."""
    kit = ff.real_pair("classic", 384, images=12, calibration=8, test=4)
    assert kit is not None
    return kit


def _report(model, x, inverse=None):
    with torch.no_grad():
        y, base = translate_with_base(model, x, tile=0)
    return fd.assess(model, x, y, inverse=inverse, base=base)


def test_the_guard_passes_real_anatomy_and_flags_faults_painted_into_it(chest_kit):
    ab, ba = chest_kit.ab, chest_kit.ba
    for k, img in enumerate(chest_kit.test_a):  # the chest's other half: anatomy not fitted on
        good = _report(ab, img.x, ba)
        assert good.verdict == "ok", good.reasons
        for fault in ("paints a nodule", "erases an edge"):
            bad = _report(ff.MODEL_FAULTS[fault][1](ab, k), img.x, ba)
            assert any("the network changed a region" in r for r in bad.reasons), (fault, bad.scores)
        metal = _report(ab, ff.with_metal(img.x, k), ba)
        assert any("saturated regions unlike the training data" in r for r in metal.reasons), metal.scores


def test_the_guard_flags_another_body_part_from_another_detector(chest_kit):
    leg = ff.real_radiograph(ff.REAL_LEG)
    for img in ff.real_crops(leg, "left", 2, 0, 384) + ff.real_crops(leg, "right", 2, 0, 384):
        report = _report(chest_kit.ab, img.x, chest_kit.ba)
        assert any("unlike the training data" in r for r in report.reasons), report.scores

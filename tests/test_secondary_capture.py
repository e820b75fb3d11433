"""Secondary Capture output: dciodvfy-clean, same patient/study, deterministic UIDs, provenance."""
from __future__ import annotations

import subprocess

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLSLossless, SecondaryCaptureImageStorage

from dicom_node.engine import load_style_model, new_style_model, save_style_model
from dicom_node.engine.pipeline import save_translation, translate_radiograph
from dicom_node.engine.pixels import decode_dataset, output_window, read_dicom
from dicom_node.engine.secondary_capture import derived_uid, make_secondary_capture
from tests.conftest import require_tool
from tests.factory import DX_PRESENTATION, PATIENT_ID, PATIENT_NAME, encode_as, make_dataset, phantom, write


def translate_dataset(model, ds):
    """The Secondary Capture dataset for one source dataset, as the node makes it."""
    return translate_radiograph(model, ds, decode_dataset(ds)).sc


def translate_file(model, path, outdir):
    """One DICOM file translated into ``outdir/<SOP Instance UID>.dcm``, as ``dicom-node translate`` does."""
    ds, img = read_dicom(path)
    return save_translation(translate_radiograph(model, ds, img), outdir)


def dciodvfy_errors(path) -> list[str]:
    """The "Error" lines dciodvfy reports for a file (warnings are allowed)."""
    tool = require_tool("dciodvfy")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def _source(**kwargs) -> pydicom.Dataset:
    return make_dataset(phantom(48, 40, 12), **kwargs)


def test_derived_uid_is_deterministic_valid_and_distinct():
    a = derived_uid("1.2.3", "model:1:abc")
    assert a == derived_uid("1.2.3", "model:1:abc")
    assert pydicom.uid.UID(a).is_valid and len(a) <= 64
    assert a != derived_uid("1.2.3", "model:2:abc")
    assert a != derived_uid("1.2.4", "model:1:abc")
    assert derived_uid("1.2", "3") != derived_uid("1.2.3")  # parts are separated, not concatenated


def test_sc_carries_patient_study_provenance_and_window(tiny_model, tmp_path):
    src = _source(sop_class=DX_PRESENTATION, modality="DX")
    src.SpecificCharacterSet = "ISO_IR 192"
    src.PatientName = "Ünlü^Ça\u011fla"
    src.StudyDescription = "XR CHEST PA"
    src.SeriesDescription = "PA"
    src.PatientAge = "056Y"
    src.AcquisitionDate, src.AcquisitionTime, src.ViewPosition = "20260101", "120102", "PA"
    sc = translate_dataset(tiny_model, src)

    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "StudyInstanceUID",
               "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
               "SpecificCharacterSet", "BodyPartExamined", "Modality", "AcquisitionDate", "AcquisitionTime",
               "ViewPosition"):
        assert sc[kw].value == src[kw].value, kw
    assert sc.SeriesInstanceUID == derived_uid(src.SeriesInstanceUID, tiny_model.identity)
    assert sc.SOPInstanceUID == derived_uid(src.SOPInstanceUID, tiny_model.identity)
    assert list(sc.ImageType) == ["DERIVED", "SECONDARY"]
    assert tiny_model.name in sc.SeriesDescription and "PA" in sc.SeriesDescription
    assert "dicom-node" in sc.DerivationDescription and tiny_model.name in sc.DerivationDescription
    code = sc.DerivationCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("STYLE", "99DCMNODE")
    ref = sc.SourceImageSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (src.SOPClassUID, src.SOPInstanceUID)
    equipment = sc.ContributingEquipmentSequence[0]
    assert equipment.Manufacturer == "dicom-node" and tiny_model.name in equipment.ManufacturerModelName
    assert [float(v) for v in sc.PixelSpacing] == [0.15, 0.15]
    assert (sc.Rows, sc.Columns, sc.BitsAllocated, sc.BitsStored) == (48, 40, 16, 16)
    assert sc.PhotometricInterpretation == "MONOCHROME2" and sc.PixelRepresentation == 0
    assert (float(sc.WindowCenter), float(sc.WindowWidth)) == output_window()
    assert sc.pixel_array.dtype == np.uint16 and sc.pixel_array.std() > 0

    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    again = pydicom.dcmread(path)
    assert str(again.PatientName) == "Ünlü^Ça\u011fla"  # the character set travelled with the name
    assert dciodvfy_errors(path) == []


def test_same_input_twice_gives_identical_uids_and_pixels(tiny_model, tmp_path):
    src = _source()
    one, two = translate_dataset(tiny_model, src), translate_dataset(tiny_model, src)
    assert (one.SOPInstanceUID, one.SeriesInstanceUID) == (two.SOPInstanceUID, two.SeriesInstanceUID)
    np.testing.assert_array_equal(one.pixel_array, two.pixel_array)
    # Another instance of the same series lands in the same output series, with its own UID.
    sibling = _source(series_uid=src.SeriesInstanceUID, study_uid=src.StudyInstanceUID)
    other = translate_dataset(tiny_model, sibling)
    assert other.SeriesInstanceUID == one.SeriesInstanceUID and other.SOPInstanceUID != one.SOPInstanceUID


def test_another_model_gives_another_series(tiny_model, tmp_path):
    path = save_style_model(new_style_model(ngf=4, n_blocks=1, seed=2), tmp_path / "other.safetensors",
                            name="other", version="1")
    other = load_style_model(path)
    src = _source()
    a, b = translate_dataset(tiny_model, src), translate_dataset(other, src)
    assert a.SeriesInstanceUID != b.SeriesInstanceUID and a.SOPInstanceUID != b.SOPInstanceUID
    assert a.StudyInstanceUID == b.StudyInstanceUID == src.StudyInstanceUID


@pytest.mark.parametrize("body_part,laterality,image_laterality,expected", [
    ("CHEST", "", None, None),      # unpaired: Laterality must be absent
    ("HAND", "L", None, "L"),       # paired: carried over
    ("KNEE", "", "R", "R"),         # DX Image Laterality -> series Laterality
    (None, "", None, ""),           # unknown body part: present, empty
    ("FOOT", None, "B", ""),        # both sides: no single laterality, present and empty
])
def test_laterality_rules_pass_dciodvfy(tiny_model, tmp_path, body_part, laterality, image_laterality, expected):
    src = _source(sop_class=DX_PRESENTATION, modality="DX")
    for kw, value in (("BodyPartExamined", body_part), ("Laterality", laterality),
                      ("ImageLaterality", image_laterality)):
        if value is None:
            if kw in src:
                del src[kw]
        else:
            setattr(src, kw, value)
    src.PatientOrientation = ["P", "F"]
    sc = translate_dataset(tiny_model, src)
    assert sc.get("Laterality") == expected
    assert list(sc.PatientOrientation) == ["P", "F"]
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []


@pytest.mark.parametrize("case,expected,calibration", [
    ("pixel", [0.1, 0.12], None),
    ("pixel_calibrated", [0.1, 0.12], "FIDUCIAL"),
    ("imager", [0.139, 0.139], None),
    ("imager_magnified", [0.125, 0.125], "GEOMETRY"),
])
def test_pixel_spacing_carried_over(tiny_model, tmp_path, case, expected, calibration):
    src = _source()
    del src.PixelSpacing, src.ImagerPixelSpacing
    if case.startswith("pixel"):
        src.PixelSpacing = [0.1, 0.12]
        if calibration:
            src.PixelSpacingCalibrationType = calibration
    else:
        src.ImagerPixelSpacing = [0.139, 0.139] if case == "imager" else [0.15, 0.15]
        if case == "imager_magnified":
            src.EstimatedRadiographicMagnificationFactor = 1.2
    sc = translate_dataset(tiny_model, src)
    np.testing.assert_allclose([float(v) for v in sc.PixelSpacing], expected)
    assert sc.get("PixelSpacingCalibrationType") == calibration
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []


def test_lossy_source_marks_output_lossy(tiny_model, tmp_path):
    px = phantom(48, 40, 8)
    src = make_dataset(px, bits_stored=8)
    src.BitsAllocated = 8
    src.PixelData = px.astype(np.uint8).tobytes()
    if "LossyImageCompression" in src:
        del src.LossyImageCompression
    lossy = pydicom.dcmread(write(encode_as(src, JPEGBaseline8Bit), tmp_path / "lossy.dcm"))
    del lossy.LossyImageCompression  # the transfer syntax alone must be enough
    assert translate_dataset(tiny_model, lossy).LossyImageCompression == "01"
    lossless = pydicom.dcmread(write(encode_as(src, JPEGLSLossless), tmp_path / "lossless.dcm"))
    assert "LossyImageCompression" not in translate_dataset(tiny_model, lossless)


@pytest.mark.parametrize("variant", ["mono1_jpegls", "signed_ct_like", "padded"])
def test_outputs_from_varied_sources_pass_dciodvfy(tiny_model, tmp_path, variant):
    if variant == "mono1_jpegls":
        src = encode_as(_source(photometric="MONOCHROME1", sop_class=DX_PRESENTATION, modality="DX"),
                        JPEGLSLossless)
    elif variant == "signed_ct_like":
        src = _source()
        src.PixelRepresentation = 1
        src.RescaleSlope, src.RescaleIntercept = 1, -1024
    else:
        src = _source()
        src.PixelPaddingValue = 0
        arr = src.pixel_array.copy()
        arr[:5] = 0
        src.PixelData = arr.tobytes()
    infile = write(src, tmp_path / "in.dcm")
    out = translate_file(tiny_model, infile, tmp_path / "out")
    assert out.name == derived_uid(src.SOPInstanceUID, tiny_model.identity) + ".dcm"
    assert dciodvfy_errors(out) == []
    sc = pydicom.dcmread(out)
    if variant == "padded":
        assert np.all(sc.pixel_array[:5] == 0)  # padding stays black, not restyled noise


def test_make_secondary_capture_rejects_non_uint16(tiny_model):
    with pytest.raises(ValueError):
        make_secondary_capture(_source(), np.zeros((4, 4), np.float32), tiny_model, window=(1.0, 2.0))


def test_no_phi_in_sc_provenance_text(tiny_model):
    sc = translate_dataset(tiny_model, _source())
    text = " ".join(str(sc.get(kw, "")) for kw in ("SeriesDescription", "DerivationDescription",
                                                   "WindowCenterWidthExplanation"))
    assert PATIENT_NAME not in text and PATIENT_ID not in text
    assert decode_dataset(sc).pixels.shape == (48, 40)  # the output is itself a readable radiograph


def test_long_model_name_with_backslash_still_valid(tmp_path):
    name = "Dr\\Kim soft " + "x" * 80
    path = save_style_model(new_style_model(ngf=4, n_blocks=1, seed=3), tmp_path / "odd.safetensors",
                            name=name, version="7")
    sc = translate_dataset(load_style_model(path), _source())
    # untrained: the fidelity guard flags it, so the description carries the caution prefix first
    assert sc.SeriesDescription.startswith("FIDELITY CAUTION Dr Kim soft") and len(sc.SeriesDescription) <= 64
    out = tmp_path / "sc.dcm"
    sc.save_as(out, enforce_file_format=True)
    assert dciodvfy_errors(out) == []


def test_model_output_window_metadata_sets_the_sc_window(tiny_model):
    """A model whose target style is usually shown narrower records output.window (model space)."""
    from dataclasses import replace

    model = replace(tiny_model, metadata={**tiny_model.metadata, "output": {"window": [-0.5, 0.5]}})
    sc = translate_dataset(model, _source())
    center, width = float(sc.WindowCenter), float(sc.WindowWidth)
    black, white = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    np.testing.assert_allclose([black, white], [0.25 * 65535, 0.75 * 65535], atol=1)
    assert (center, width) != output_window()


def test_a_model_producing_nan_fails_loudly(tiny_model):
    """Never an all-black SC from a broken model: an error the node records as a failure."""
    import copy

    import torch

    from dicom_node.engine.pipeline import ModelOutputError

    broken = copy.deepcopy(tiny_model)
    with torch.no_grad():
        next(broken.generator.parameters()).fill_(float("nan"))
    with pytest.raises(ModelOutputError, match="non-finite"):
        translate_dataset(broken, _source())

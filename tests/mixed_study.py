"""The mixed study a real modality might send: many encodings, photometrics, bit depths.

Why: a DICOM node that only ever sees its own uncompressed test files will break on the
first JPEG-LS chest film from a real device.  This module writes one study (one patient)
as files on disk, encoded by *independent* encoders where possible (dcmtk's
``dcmcjpeg``/``dcmcjpls``/``dcmcrle``; pydicom + openjpeg for JPEG 2000, which dcmtk 3.6
cannot write), so interop tests can push it through dcmtk ``storescu``.

Layout of :func:`build_mixed_study` (all instances share Patient and Study):

==========  ========  ===========  ======================  ==========  ============
series      modality  photometric  transfer syntax          bits        translated?
==========  ========  ===========  ======================  ==========  ============
CR          CR        MONOCHROME2  Explicit VR LE           16/16       yes
CR          CR        MONOCHROME2  JPEG lossless SV1 (.70)  16/12       yes
CR          CR        MONOCHROME2  RLE lossless             16/12       yes
CR          CR        MONOCHROME2  JPEG 2000 lossless       16/16       yes
DX          DX        MONOCHROME1  Implicit VR LE           8/8         yes
DX          DX        MONOCHROME1  JPEG-LS lossless         16/12       yes
CT          CT        MONOCHROME2  Explicit VR LE           16/12       no (route)
SR          SR        -            Explicit VR LE           -           no (no pixels)
==========  ========  ===========  ======================  ==========  ============
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from tests.factory import CR_STORAGE, PATIENT_ID, PATIENT_NAME, make_dataset, phantom

DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

# Which external encoder writes each compressed transfer syntax.
DCMTK_ENCODERS = {
    JPEGLosslessSV1: ["dcmcjpeg", "+e1"],
    JPEGLSLossless: ["dcmcjpls", "+el"],
    RLELossless: ["dcmcrle"],
}


@dataclass
class Instance:
    """One file of the mixed study and what the node is expected to do with it."""

    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    transfer_syntax: str
    modality: str
    photometric: str | None
    bits_stored: int | None
    translated: bool  # the test route matches Modality CR/DX only
    label: str


@dataclass
class MixedStudy:
    study_instance_uid: str
    patient_id: str
    patient_name: str
    instances: list[Instance] = field(default_factory=list)

    @property
    def translated(self) -> list[Instance]:
        return [i for i in self.instances if i.translated]

    @property
    def translated_series(self) -> set[str]:
        return {i.series_instance_uid for i in self.translated}

    @property
    def transfer_syntaxes(self) -> set[str]:
        return {i.transfer_syntax for i in self.instances}


def _encode_with_dcmtk(src: Path, dst: Path, syntax: str) -> None:
    """Compress ``src`` into ``dst`` with a dcmtk command-line encoder."""
    cmd = list(DCMTK_ENCODERS[syntax])
    if shutil.which(cmd[0]) is None:
        raise FileNotFoundError(f"{cmd[0]} (dcmtk) is needed to encode {syntax.name}")
    subprocess.run([*cmd, str(src), str(dst)], check=True, capture_output=True, timeout=60)


def _save(ds: Dataset, path: Path, syntax: str) -> Path:
    """Write ``ds`` encoded as ``syntax`` to ``path`` (uncompressed input in memory)."""
    if syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = syntax
        ds.save_as(str(path), enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian)
    elif syntax in DCMTK_ENCODERS:
        raw = path.with_suffix(".raw.dcm")
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(str(raw), enforce_file_format=True)
        _encode_with_dcmtk(raw, path, syntax)
        raw.unlink()
    elif syntax == JPEG2000Lossless:
        ds.compress(JPEG2000Lossless)  # pylibjpeg-openjpeg encoder
        ds.save_as(str(path), enforce_file_format=True)
    else:  # pragma: no cover - a new syntax needs an encoder first
        raise ValueError(f"no encoder for {syntax}")
    return path


def _common(ds: Dataset, study_uid: str, number: int) -> Dataset:
    """Put every object into the same study with consistent patient/study attributes."""
    ds.StudyInstanceUID = study_uid
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.InstanceNumber = number
    return ds


def make_basic_text_sr(study_uid: str, series_uid: str) -> Dataset:
    """A small Basic Text SR (a radiologist's report): no pixels, must not be translated."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC001"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Modality = "SR"
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.Manufacturer = "TestVendor"
    ds.ContentDate = "20260101"
    ds.ContentTime = "121500"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ReferencedPerformedProcedureStepSequence = Sequence()
    ds.PerformedProcedureCodeSequence = Sequence()
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "18748-4", "LN", "Diagnostic Imaging Report"
    ds.ConceptNameCodeSequence = Sequence([title])
    finding = Dataset()
    finding.RelationshipType = "CONTAINS"
    finding.ValueType = "TEXT"
    name = Dataset()
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "121071", "DCM", "Finding"
    finding.ConceptNameCodeSequence = Sequence([name])
    finding.TextValue = "No acute findings (synthetic test report)."
    ds.ContentSequence = Sequence([finding])
    return ds


def build_mixed_study(out_dir: Path, *, rows: int = 96, cols: int = 80) -> MixedStudy:
    """Write the mixed study into ``out_dir`` (one file per instance) and describe it.

    Images are small (``rows`` x ``cols``) so the whole study translates in seconds with a
    tiny model; the point is the encodings, not the size.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = generate_uid()
    cr_series, dx_series, ct_series, sr_series = (generate_uid() for _ in range(4))
    study = MixedStudy(study_uid, PATIENT_ID, PATIENT_NAME)

    # (label, series, modality, sop class, photometric, bits allocated, bits stored, syntax, translated)
    plan = [
        ("cr16-explicit", cr_series, "CR", CR_STORAGE, "MONOCHROME2", 16, 16, ExplicitVRLittleEndian, True),
        ("cr12-jpeg-lossless", cr_series, "CR", CR_STORAGE, "MONOCHROME2", 16, 12, JPEGLosslessSV1, True),
        ("cr12-rle", cr_series, "CR", CR_STORAGE, "MONOCHROME2", 16, 12, RLELossless, True),
        ("cr16-j2k", cr_series, "CR", CR_STORAGE, "MONOCHROME2", 16, 16, JPEG2000Lossless, True),
        ("dx8-mono1-implicit", dx_series, "DX", DX_PRESENTATION, "MONOCHROME1", 8, 8, ImplicitVRLittleEndian, True),
        ("dx12-mono1-jpegls", dx_series, "DX", DX_PRESENTATION, "MONOCHROME1", 16, 12, JPEGLSLossless, True),
        ("ct12-explicit", ct_series, "CT", CTImageStorage, "MONOCHROME2", 16, 12, ExplicitVRLittleEndian, False),
    ]
    for number, (label, series, modality, sop_class, photometric, alloc, bits, syntax, translated) in enumerate(
        plan, start=1
    ):
        pixels = phantom(rows, cols, bits, seed=number)
        ds = make_dataset(
            pixels, bits_stored=bits, photometric=photometric, sop_class=sop_class, modality=modality,
            study_uid=study_uid, series_uid=series,
        )
        del ds.Laterality  # Type 2C: only for paired body parts (CHEST is not)
        ds.ViewPosition = "PA"
        if alloc == 8:
            ds.BitsAllocated = 8
            ds.PixelData = pixels.astype(np.uint8).tobytes()
        if modality == "DX":
            _make_valid_dx(ds)
        if modality == "CT":
            _make_valid_ct(ds)
        _common(ds, study_uid, number)
        path = _save(ds, out_dir / f"{number:02d}-{label}.dcm", syntax)
        study.instances.append(
            Instance(path, ds.SOPInstanceUID, series, syntax, modality, photometric, bits, translated, label)
        )

    sr = _common(make_basic_text_sr(study_uid, sr_series), study_uid, len(plan) + 1)
    path = _save(sr, out_dir / f"{len(plan) + 1:02d}-sr.dcm", ExplicitVRLittleEndian)
    study.instances.append(
        Instance(path, sr.SOPInstanceUID, sr_series, ExplicitVRLittleEndian, "SR", None, None, False, "sr")
    )
    _check_written(study)
    return study


def _make_valid_dx(ds: Dataset) -> None:
    """Attributes the DX IOD requires beyond a CR (so the source itself is plausible)."""
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PresentationLUTShape = "INVERSE" if ds.PhotometricInterpretation == "MONOCHROME1" else "IDENTITY"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.BurnedInAnnotation = "NO"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1 if ds.PhotometricInterpretation == "MONOCHROME1" else 1
    ds.WindowCenter = 2 ** (ds.BitsStored - 1)
    ds.WindowWidth = 2 ** ds.BitsStored
    ds.ImageLaterality = "U"
    ds.LossyImageCompression = "00"
    ds.DetectorType = "SCINTILLATOR"
    ds.PositionerType = "NONE"
    ds.AcquisitionContextSequence = Sequence()
    ds.PatientOrientation = ["P", "L"]
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "T-D3000", "SRT", "Chest"
    ds.AnatomicRegionSequence = Sequence([region])


def _make_valid_ct(ds: Dataset) -> None:
    """Attributes of a single CT slice (a modality the radiograph route must leave alone)."""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceThickness = 1.0
    ds.KVP = 120
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.RescaleType = "HU"
    ds.PatientPosition = "HFS"
    del ds.ImagerPixelSpacing, ds.ViewPosition


def _check_written(study: MixedStudy) -> None:
    """Every file reads back with the intended syntax and decodable pixels (guards the encoders)."""
    for inst in study.instances:
        ds = pydicom.dcmread(str(inst.path))
        got = ds.file_meta.TransferSyntaxUID
        if got != inst.transfer_syntax:
            raise AssertionError(f"{inst.label}: written as {got}, wanted {inst.transfer_syntax}")
        if inst.photometric is not None:
            arr = ds.pixel_array
            if arr.shape != (ds.Rows, ds.Columns):
                raise AssertionError(f"{inst.label}: pixel array shape {arr.shape}")


def make_large_radiograph(path: Path, *, rows: int = 2500, cols: int = 1400, seed: int = 0,
                          study_uid: str | None = None, series_uid: str | None = None) -> Path:
    """One uncompressed 16-bit CR of about rows*cols*2 bytes (default ~7 MB) for benchmarks."""
    ds = make_dataset(phantom(rows, cols, 12, seed), study_uid=study_uid, series_uid=series_uid)
    ds.save_as(str(path), enforce_file_format=True)
    return Path(path)

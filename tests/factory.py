"""Synthetic DICOM objects for tests: small radiographs made in code (no patient data)."""
from __future__ import annotations

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
PATIENT_NAME = "SECRET^PATIENT"  # tests grep logs for this
PATIENT_ID = "PID-SECRET-0042"


def phantom(rows: int = 128, cols: int = 112, bits: int = 12, seed: int = 0) -> np.ndarray:
    """A smooth radiograph-like image with some edges and noise, values in [0, 2**bits)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    cy, cx = rows / 2, cols / 2
    body = np.exp(-(((y - cy) / (0.45 * rows)) ** 2 + ((x - cx) / (0.35 * cols)) ** 2))
    ribs = 0.15 * (np.sin(y / max(rows, 1) * 40) > 0.6)
    img = 0.15 + 0.6 * body + ribs * body + 0.02 * rng.standard_normal((rows, cols))
    img = np.clip(img, 0, 1)
    return np.round(img * (2**bits - 1)).astype(np.uint16)


def make_dataset(
    pixels: np.ndarray | None = None,
    *,
    rows: int = 128,
    cols: int = 112,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    sop_class: str = CR_STORAGE,
    modality: str = "CR",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    seed: int = 0,
) -> Dataset:
    """A valid uncompressed single-frame grayscale image dataset (Explicit VR Little Endian)."""
    if pixels is None:
        pixels = phantom(rows, cols, bits_stored, seed)
    rows, cols = pixels.shape
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC001"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.Laterality = ""
    ds.PatientOrientation = ""
    ds.Manufacturer = "TestVendor"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [0.15, 0.15]
    ds.ImagerPixelSpacing = [0.15, 0.15]
    if sop_class == CTImageStorage:
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def write(ds: Dataset, path) -> str:
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


def read(path) -> Dataset:
    return pydicom.dcmread(str(path))

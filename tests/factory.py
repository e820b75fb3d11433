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


# ----------------------------------------------------------------- transfer syntax encoders
# Added for the pixel pipeline tests: every common transfer syntax from one uncompressed dataset.
# pydicom encodes RLE, JPEG-LS (pyjpegls) and JPEG 2000 (openjpeg); it has no JPEG (ITU T.81)
# encoder, so baseline, extended 12-bit and lossless (process 14, SV1) come from imagecodecs
# (libjpeg-turbo 3, which writes 8/12-bit DCT and 2..16-bit lossless streams).
def _jpeg_stream(pixels: np.ndarray, syntax: str, bits_stored: int) -> bytes:
    import imagecodecs
    from pydicom.uid import JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1

    if syntax == JPEGBaseline8Bit:
        return bytes(imagecodecs.jpeg8_encode(pixels.astype(np.uint8), level=95))
    if syntax == JPEGExtended12Bit:
        return bytes(imagecodecs.jpeg8_encode(pixels.astype(np.uint16), level=95, bitspersample=12))
    predictor = {JPEGLossless: 7, JPEGLosslessSV1: 1}[syntax]  # process 14 with any predictor vs SV1
    return bytes(imagecodecs.jpeg8_encode(pixels.astype(np.uint16), lossless=True, predictor=predictor,
                                          bitspersample=bits_stored))


def encode_as(ds: Dataset, syntax: str, **kwargs) -> Dataset:
    """A copy of uncompressed ``ds`` whose Pixel Data is in transfer syntax ``syntax``.

    ``kwargs`` go to ``Dataset.compress`` (e.g. ``jls_error=2``, ``j2k_cr=[10]``). Save the
    result with :func:`write` (``save_as`` applies implicit VR / deflate from the file meta).
    """
    import copy

    from pydicom.encaps import encapsulate
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        ImplicitVRLittleEndian,
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLossless,
        JPEGLosslessSV1,
    )

    out = copy.deepcopy(ds)
    if syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        out.file_meta.TransferSyntaxUID = syntax
    elif syntax == ExplicitVRBigEndian:
        if out.BitsAllocated == 16:
            out.PixelData = out.pixel_array.astype(">u2" if out.PixelRepresentation == 0 else ">i2").tobytes()
        out.file_meta.TransferSyntaxUID = syntax
    elif syntax in (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1):
        stream = _jpeg_stream(out.pixel_array, syntax, int(out.BitsStored))
        out.PixelData = encapsulate([stream])
        out["PixelData"].VR = "OB"
        out.file_meta.TransferSyntaxUID = syntax
        if syntax in (JPEGBaseline8Bit, JPEGExtended12Bit):
            out.LossyImageCompression = "01"
    else:
        out.compress(syntax, **kwargs)
    return out


def make_non_image(modality: str = "SR", sop_class: str = "1.2.840.10008.5.1.4.1.1.88.11") -> Dataset:
    """A valid object without pixels (default: a Basic Text SR header), same patient/study shape."""
    ds = make_dataset(rows=8, cols=8)
    for kw in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
               "SamplesPerPixel", "PhotometricInterpretation", "PixelSpacing", "ImagerPixelSpacing",
               "PatientOrientation", "Laterality", "BodyPartExamined"):
        if kw in ds:
            del ds[kw]
    ds.Modality = modality
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    return ds


def trained_like_generator(ngf: int = 4, blocks: int = 1, seed: int = 11):
    """A generator with the weight scales of a trained one, built in code (no training).

    Choice (documented in docs/seamless.md): a residual generator (output = clamp(x + tanh(z)))
    with He-scaled weights N(0, 2/fan_in) instead of the N(0, 0.02) init, biases N(0, 0.5)
    (large per-channel means: the case where InstanceNorm statistics and their numerical
    accuracy matter most), and the last convolution (weights and bias) scaled by 0.2.  Its output follows the
    anatomy (correlation ~0.9 with the input) with a visible, structured tone/texture change,
    like a trained style model, unlike a freshly initialised network whose output is nearly
    constant.  Fitting a few hundred steps instead was tried and costs > 30 s CPU per run.
    """
    import torch

    from dicom_node.engine import new_style_model

    gen = new_style_model(ngf=ngf, n_blocks=blocks, residual=True, seed=seed)
    rng = torch.Generator().manual_seed(seed)
    convs = [m for m in gen.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    with torch.no_grad():
        for m in convs:
            w = m.weight
            fan_in = w[0].numel() if isinstance(m, torch.nn.Conv2d) else w.shape[0] * w[0, 0].numel()
            w.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=rng)
            m.bias.normal_(0.0, 0.5, generator=rng)
        convs[-1].weight.mul_(0.2)
        convs[-1].bias.mul_(0.2)
    return gen.eval()

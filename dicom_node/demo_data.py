"""Write synthetic paired radiographs in two vendor styles as DICOM CR files.

Layout (documented in docs/demo-data.md; the trainer's validation and ``evaluate`` rely on it)::

    OUTDIR/A/NNNN_PART.dcm        training images, style A (MONOCHROME1)
    OUTDIR/B/NNNN_PART.dcm        the same exposures, style B (MONOCHROME2)
    OUTDIR/test/A/NNNN_PART.dcm   held-out pairs (other phantoms), style A
    OUTDIR/test/B/NNNN_PART.dcm   ... and style B
    OUTDIR/manifest.json          the parameters and the style definitions

The same file name in A/ and B/ marks a pair: one phantom, one exposure (the same quantum
noise), processed by the two styles.  Held-out images use indices after the training ones,
so they are different phantoms.  Everything (pixels, UIDs, dates) is a pure function of
(seed, index, size), so the same command writes byte-identical pixel data.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.errors import UserError
from dicom_node.phantoms import Phantom, make_phantom, render
from dicom_node.styles import MAX_VALUE, STYLES, VendorStyle, process, to_stored

__all__ = ["CR_IMAGE_STORAGE", "DemoCase", "render_case", "case_dataset", "write_demo_data"]

log = logging.getLogger(__name__)

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
MIN_SIZE, MAX_SIZE = 64, 4096


@dataclass
class DemoCase:
    """One phantom exposure rendered in both styles (stored 12-bit values)."""

    index: int
    name: str  # file name, identical in A/ and B/
    phantom: Phantom
    stored: dict[str, np.ndarray]  # style key -> uint16 stored values


def _uid(seed: int, index: int, *parts: str) -> str:
    """A deterministic UID (2.25 form) derived from the data set seed, the case and a role."""
    digest = hashlib.sha256("|".join(["dicom-node-demo", str(seed), str(index), *parts]).encode()).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16]).int}"


def render_case(index: int, size: int, seed: int) -> DemoCase:
    """Render phantom ``index`` once and process the raw image with both styles."""
    ph = make_phantom(index, size, seed)
    raw = render(ph, np.random.default_rng([seed, index, 1]))
    stored = {key: to_stored(process(raw, style), style) for key, style in STYLES.items()}
    name = f"{index:04d}_{ph.body_part.lower()}.dcm"
    return DemoCase(index=index, name=name, phantom=ph, stored=stored)


def case_dataset(case: DemoCase, style: VendorStyle, seed: int) -> Dataset:
    """A CR Image Storage dataset with synthetic, plausible headers (no real person)."""
    ph = case.phantom
    pixels = case.stored[style.key]
    i = case.index
    date = (_dt.date(2026, 1, 5) + _dt.timedelta(days=i)).strftime("%Y%m%d")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = _uid(seed, i, "instance", style.key)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    # Patient / study: one synthetic patient and study per phantom, shared by both styles.
    ds.PatientName = f"DEMO^PHANTOM{i:04d}"
    ds.PatientID = f"DEMO-{seed}-{i:04d}"
    ds.PatientBirthDate = f"{1940 + (i * 7) % 60}0101"
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "NO"  # synthetic: there never was an identity
    ds.StudyInstanceUID = _uid(seed, i, "study")
    ds.StudyDate = date
    ds.StudyTime = "093000"
    ds.StudyID = f"{i + 1}"
    ds.AccessionNumber = f"DEMO{seed % 1000:03d}{i:05d}"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"XR {ph.body_part} {ph.view} (synthetic demo)"
    # Series: one per style (as if the exposure had been processed by two vendors' software).
    ds.SeriesInstanceUID = _uid(seed, i, "series", style.key)
    ds.SeriesNumber = 1 if style.key == "A" else 2
    ds.SeriesDescription = f"{ph.body_part} {ph.view} - {style.name}"
    ds.SeriesDate = date
    ds.SeriesTime = "093000"
    ds.Modality = "CR"
    ds.BodyPartExamined = ph.body_part
    ds.ViewPosition = ph.view
    if ph.laterality:  # paired body parts only; dciodvfy rejects it (and ImageLaterality) on a chest
        ds.Laterality = ph.laterality
    ds.PatientOrientation = ["L", "F"] if ph.view == "PA" else ["R", "F"]
    ds.Manufacturer = style.manufacturer
    ds.ManufacturerModelName = style.model_name
    ds.InstitutionName = "dicom-node synthetic data"
    ds.SoftwareVersions = "dicom-node demo-data"
    ds.InstanceNumber = 1
    ds.ContentDate = date
    ds.ContentTime = "093000"
    ds.AcquisitionDate = date
    ds.AcquisitionTime = "092959"
    ds.KVP = 120 if ph.body_part == "CHEST" else 65
    ds.DerivationDescription = f"synthetic phantom, {style.name} processing"
    # Pixels: 12-bit unsigned in 16-bit words.
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = style.photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    spacing = round(ph.pixel_spacing_mm, 6)
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacing = [spacing, spacing]
    ds.WindowCenter = (MAX_VALUE + 1) // 2
    ds.WindowWidth = MAX_VALUE + 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    return ds


def write_demo_data(outdir: str | Path, *, count: int = 24, test_count: int = 6, size: int = 1024,
                    seed: int = 0, progress: bool = False) -> dict:
    """Write ``count`` training pairs and ``test_count`` held-out pairs; returns the manifest."""
    if count < 0 or test_count < 0 or count + test_count == 0:
        raise UserError("--count and --test-count must be >= 0, and not both 0")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise UserError(f"--size must be between {MIN_SIZE} and {MAX_SIZE}")
    out = Path(outdir)
    folders = {("train", k): out / k for k in STYLES} | {("test", k): out / "test" / k for k in STYLES}
    for f in folders.values():
        f.mkdir(parents=True, exist_ok=True)
    jobs = [("train", i) for i in range(count)] + [("test", count + i) for i in range(test_count)]
    iterator = jobs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(jobs, desc="demo-data", unit="pair")
    files: dict[str, list[str]] = {"train": [], "test": []}
    for split, index in iterator:
        case = render_case(index, size, seed)
        for key, style in STYLES.items():
            case_dataset(case, style, seed).save_as(folders[(split, key)] / case.name, enforce_file_format=True)
        files[split].append(case.name)
        log.debug("wrote pair %s (%s)", case.name, split)
    manifest = {
        "generator": "dicom-node demo-data",
        "seed": seed,
        "size": size,
        "count": count,
        "test_count": test_count,
        "layout": {"train": ["A", "B"], "test": ["test/A", "test/B"]},
        "styles": {k: s.describe() for k, s in STYLES.items()},
        "files": files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest

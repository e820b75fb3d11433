"""Write synthetic radiographs in two vendor styles as DICOM CR files, paired or unpaired.

Layout (documented in docs/demo-data.md; the trainer's validation and ``evaluate`` rely on it)::

    OUTDIR/A/NNNN_PART.dcm        training images, style A (classic pair: MONOCHROME1)
    OUTDIR/B/NNNN_PART.dcm        the same exposures, style B (classic pair: MONOCHROME2)
    OUTDIR/test/A/NNNN_PART.dcm   held-out pairs (other phantoms), style A
    OUTDIR/test/B/NNNN_PART.dcm   ... and style B
    OUTDIR/manifest.json          the parameters and the style definitions

The same file name in A/ and B/ marks a pair: one phantom, one exposure (the same quantum
noise), processed by the two styles.  Held-out images use indices after the training ones,
so they are different phantoms.

Unpaired (``unpaired=True``): ``A/aNNNN_PART.dcm`` are phantoms 0..count-1 in style A only,
``B/bNNNN_PART.dcm`` phantoms count..2*count-1 in style B only (disjoint exposures, patients,
studies and UIDs); ``test/`` holds true pairs of phantoms 2*count.. as in paired mode.

``source="real"``: the cases are crops of varying field of view of real CR radiographs
(:mod:`.real_crops`) instead of phantoms, A, B and test from disjoint regions of them; the
manifest adds ``"source": "real"`` and where each crop came from (``crops``).

``style_pair`` picks the two styles from :data:`.vendor_processing.STYLE_PAIRS`.  Everything
(pixels, UIDs, dates) is a pure function of (seed, index, size, style pair, mode), so the
same command writes byte-identical files; the default (paired, classic) writes exactly what
it wrote before style pairs and unpaired mode existed.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from dicom_node.demo.nonlinear_styles import NonlinearStyle, phantom_scale, process_nonlinear
from dicom_node.demo.phantoms import Phantom, make_phantom, render
from dicom_node.demo.vendor_processing import (
    DEFAULT_STYLE_PAIR,
    STYLES,
    VendorStyle,
    get_style_pair,
    process,
    to_stored,
)
from dicom_node.errors import UserError

__all__ = ["CR_IMAGE_STORAGE", "SOURCES", "DemoCase", "render_case", "render_real_case", "case_dataset",
           "write_demo_data"]

log = logging.getLogger(__name__)

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
MIN_SIZE, MAX_SIZE = 64, 4096
SOURCES = ("phantom", "real")  # --source: procedural phantoms, or crops of real radiographs (real_crops.py)


@dataclass
class DemoCase:
    """One phantom exposure rendered in one or both styles (stored values)."""

    index: int
    name: str  # file name, identical in A/ and B/ for a pair
    phantom: Phantom
    stored: dict[str, np.ndarray]  # style key -> uint16 stored values
    tag: str = ""  # "" for a pair; "a" / "b" for an unpaired single-style case (file name, PatientID)
    namespace: tuple[str, ...] = ()  # extra UID parts: () for the classic paired data set


def _uid(seed: int, index: int, *parts: str) -> str:
    """A deterministic UID (2.25 form) derived from the data set seed, the case and a role."""
    digest = hashlib.sha256("|".join(["dicom-node-demo", str(seed), str(index), *parts]).encode()).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16]).int}"


def render_case(index: int, size: int, seed: int, styles: Mapping[str, VendorStyle | NonlinearStyle] | None = None, *,
                tag: str = "", namespace: tuple[str, ...] = ()) -> DemoCase:
    """Render phantom ``index`` once and process the raw image with each style (default: the classic pair)."""
    chosen: Mapping[str, VendorStyle | NonlinearStyle] = STYLES if styles is None else styles
    ph = make_phantom(index, size, seed)
    raw = render(ph, np.random.default_rng([seed, index, 1]))
    stored = {key: to_stored(process_nonlinear(phantom_scale(raw, ph.body_part), style)
                             if isinstance(style, NonlinearStyle) else process(raw, style), style)
              for key, style in chosen.items()}
    name = f"{tag}{index:04d}_{ph.body_part.lower()}.dcm"
    return DemoCase(index=index, name=name, phantom=ph, stored=stored, tag=tag, namespace=namespace)


def render_real_case(index: int, size: int, seed: int, styles: dict[str, VendorStyle | NonlinearStyle], split: str,
                     *, tag: str = "", namespace: tuple[str, ...] = ()) -> DemoCase:
    """Crop ``index`` of the real radiographs (even: the chest, odd: the leg) from ``split``'s
    region ("a", "b" or "test"; see :mod:`.real_crops`), processed with each style.  A nonlinear
    style sees the crop through the source's fixed window; a linear one windows it itself."""
    from dicom_node.demo.real_crops import load_real_sources, real_crop

    sources = load_real_sources()
    source = sources[index % len(sources)]
    crop, info = real_crop(source, split, size, np.random.default_rng([seed, index, 2]))
    stored = {key: to_stored(process_nonlinear(crop / source.full_scale, style)
                             if isinstance(style, NonlinearStyle) else process(crop, style), style)
              for key, style in styles.items()}
    empty = np.zeros((0, 0))
    ph = Phantom(soft=empty, bone=empty, pixel_spacing_mm=source.pixel_spacing_mm, body_part=source.body_part,
                 laterality=source.laterality, view=source.view, info={"kind": "real", **info})
    name = f"{tag}{index:04d}_{source.body_part.lower()}.dcm"
    return DemoCase(index=index, name=name, phantom=ph, stored=stored, tag=tag, namespace=namespace)


def case_dataset(case: DemoCase, style: VendorStyle | NonlinearStyle, seed: int) -> Dataset:
    """A CR Image Storage dataset with synthetic, plausible headers (no real person)."""
    ph = case.phantom
    pixels = case.stored[style.key]
    i = case.index
    ns, tag = case.namespace, case.tag
    date = (_dt.date(2026, 1, 5) + _dt.timedelta(days=i)).strftime("%Y%m%d")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(CR_IMAGE_STORAGE)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(_uid(seed, i, *ns, "instance", style.key))
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    # Patient / study: one synthetic patient and study per phantom, shared by both styles of a pair.
    ds.PatientName = f"DEMO^PHANTOM{tag.upper()}{i:04d}"
    ds.PatientID = f"DEMO-{seed}-{tag}{i:04d}"
    ds.PatientBirthDate = f"{1940 + (i * 7) % 60}0101"
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "NO"  # synthetic: there never was an identity
    ds.StudyInstanceUID = _uid(seed, i, *ns, "study")
    ds.StudyDate = date
    ds.StudyTime = "093000"
    ds.StudyID = f"{i + 1}"
    ds.AccessionNumber = f"DEMO{seed % 1000:03d}{tag.upper()}{i:05d}"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"XR {ph.body_part} {ph.view} (synthetic demo)"
    # Series: one per style (as if the exposure had been processed by two vendors' software).
    ds.SeriesInstanceUID = _uid(seed, i, *ns, "series", style.key)
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
    if ph.info.get("kind") == "real":
        ds.DerivationDescription = f"crop of a real CR ({ph.info['source']}, pydicom-data), {style.name} processing"
    else:
        ds.DerivationDescription = f"synthetic phantom, {style.name} processing"
    # Pixels: style.bits-bit unsigned (12 unless the style says otherwise) in 16-bit words.
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = style.photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = style.bits
    ds.HighBit = style.bits - 1
    ds.PixelRepresentation = 0
    spacing = round(ph.pixel_spacing_mm, 6)
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacing = [spacing, spacing]
    ds.WindowCenter = (style.max_value + 1) // 2
    ds.WindowWidth = style.max_value + 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    return ds


def write_demo_data(outdir: str | Path, *, count: int = 24, test_count: int = 6, size: int = 1024,
                    seed: int = 0, progress: bool = False, unpaired: bool = False,
                    style_pair: str = DEFAULT_STYLE_PAIR, source: str = "phantom") -> dict[str, Any]:
    """Write ``count`` training pairs (or, ``unpaired``, ``count`` images per style from disjoint
    phantoms) and ``test_count`` held-out pairs in the two styles of ``style_pair``; returns the manifest.

    ``source="real"``: crops of varying field of view of real CR radiographs instead of phantoms
    (:mod:`.real_crops`; A, B and test from disjoint regions); needs pydicom-data."""
    if count < 0 or test_count < 0 or count + test_count == 0:
        raise UserError("--count and --test-count must be >= 0, and not both 0")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise UserError(f"--size must be between {MIN_SIZE} and {MAX_SIZE}")
    if source not in SOURCES:
        raise UserError(f"unknown --source {source!r} (choose from {', '.join(SOURCES)})")
    pair = get_style_pair(style_pair)
    styles = pair.styles
    real = source == "real"
    if real:
        from dicom_node.demo.real_crops import load_real_sources

        load_real_sources()  # a missing pydicom-data is refused before anything is written
    legacy = style_pair == DEFAULT_STYLE_PAIR and not unpaired and not real  # today's data set, byte for byte
    # Distinct UIDs for every other data set of the same seed (the same index there is other pixels).
    namespace = () if legacy else ((f"pair={style_pair}",) + (("unpaired",) if unpaired else ())
                                   + (("source=real",) if real else ()))
    out = Path(outdir)
    folders = {("train", k): out / k for k in styles} | {("test", k): out / "test" / k for k in styles}
    for f in folders.values():
        f.mkdir(parents=True, exist_ok=True)
    # (split, phantom index, style keys, tag): paired cases get both styles, unpaired ones one.
    if unpaired:
        a_key, b_key = pair.a.key, pair.b.key
        jobs: list[tuple[str, int, tuple[str, ...], str]] = (
                [("train", i, (a_key,), "a") for i in range(count)]
                + [("train", count + i, (b_key,), "b") for i in range(count)]
                + [("test", 2 * count + i, (a_key, b_key), "") for i in range(test_count)])
    else:
        jobs = ([("train", i, tuple(styles), "") for i in range(count)]
                + [("test", count + i, tuple(styles), "") for i in range(test_count)])
    iterator: Iterable[tuple[str, int, tuple[str, ...], str]] = jobs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(jobs, desc="demo-data", unit="case" if unpaired else "pair")
    files: dict[str, list[str]] = {"A": [], "B": [], "test": []} if unpaired else {"train": [], "test": []}
    crops: dict[str, dict[str, Any]] = {}
    for split, index, keys, tag in iterator:
        chosen = {k: styles[k] for k in keys}
        if real:  # region: A's crops (and paired training) left, B's right, test/ the bottom band
            region = "test" if split == "test" else ("b" if tag == "b" else "a")
            case = render_real_case(index, size, seed, chosen, region, tag=tag, namespace=namespace)
            crops[f"{split}/{case.name}"] = {k: v for k, v in case.phantom.info.items() if k != "kind"}
        else:
            case = render_case(index, size, seed, chosen, tag=tag, namespace=namespace)
        for key in keys:
            case_dataset(case, styles[key], seed).save_as(folders[(split, key)] / case.name, enforce_file_format=True)
        files[keys[0] if tag else split].append(case.name)
        log.debug("wrote %s (%s, %s)", case.name, split, "/".join(keys))
    manifest = {
        "generator": "dicom-node demo-data",
        "seed": seed,
        "size": size,
        "count": count,
        "test_count": test_count,
    }
    if not legacy:  # absent = paired, classic (manifests written before these keys existed)
        manifest |= {"unpaired": unpaired, "style_pair": style_pair, "style_pair_description": pair.description}
    if real:  # absent = phantoms
        manifest |= {"source": "real", "crops": crops}
    manifest |= {
        "layout": {"train": ["A", "B"], "test": ["test/A", "test/B"]},
        "styles": {k: s.describe() for k, s in styles.items()},
        "files": files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest

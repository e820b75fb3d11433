"""Crops of varying field of view from real CR radiographs (``demo-data --source real``).

Why: every phantom is a whole image of similar content, which hides any processing or
normalisation that depends on the image's content.  Real sites send differently collimated
exposures of different patients; crops of different sizes and positions of real anatomy,
some with collimator-like borders, make a content-dependent normalisation show up as a
difference between crops.

The radiographs are pydicom's public test images from the ``pydicom-data`` package (the test
extra; never downloaded at run time, nothing kept in this repository): a Philips CR chest
(RG1, 15 bit) and a Fuji CR leg (RG3, 10 bit), decoded as the node decodes them (modality
values, MONOCHROME1 mirrored, so bone is bright).  ``u`` is that value over the source's full
stored range ``2**BitsStored - 1``: a fixed window, the same for every crop.

Regions (of each radiograph's exposed field, so A/, B/ and test/ never share a pixel of
anatomy): A crops come from the left half of the top 75 % of the rows, B crops from the
right half of it, held-out test crops from the bottom 25 % (full width).  Half of the crops,
at random, are mirrored left to right, so both domains see both orientations.  A crop's side is drawn between half of
``size`` and ``size`` (rows and columns apart), limited by its region; half of the crops get
collimator borders on some sides: a soft-edged band of nearly unexposed detector (the top of
the range, bone bright, with a little scatter and noise).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from dicom_node.errors import UserError

__all__ = ["REAL_SOURCES", "RealSource", "load_real_sources", "real_crop"]

# pydicom-data file, BodyPartExamined, view, laterality, nominal pixel spacing in mm (the
# files carry none: RG1 has PixelSpacing 0, RG3 none), the exposed columns (RG3's own
# collimator leaves only columns ~362..1371 exposed; crops stay inside, the borders are ours).
REAL_SOURCES = (("RG1_UNCR.dcm", "CHEST", "PA", "", 0.2, (0, 1841)),
                ("RG3_UNCR.dcm", "LEG", "AP", "R", 0.2, (400, 1340)))
TRAIN_ROWS = 0.75  # the top 75 % of the rows are training (A left, B right), the rest held out
COLLIMATED = 0.97  # collimated detector: this fraction of the full scale (almost no exposure)


@dataclass(frozen=True)
class RealSource:
    """One decoded real radiograph: modality values (bone bright) and the facts its crops carry."""

    file: str
    pixels: np.ndarray  # float32, modality values, MONOCHROME1 mirrored
    full_scale: float  # 2**BitsStored - 1: u = pixels / full_scale
    body_part: str
    view: str
    laterality: str
    pixel_spacing_mm: float
    columns: tuple[int, int]  # the exposed field's columns


@functools.lru_cache(maxsize=1)
def load_real_sources() -> tuple[RealSource, ...]:
    """The real radiographs (decoded once per process); a :class:`UserError` without pydicom-data."""
    from dicom_node.engine.pixels import read_dicom

    out = []
    for name, part, view, laterality, spacing, columns in REAL_SOURCES:
        try:
            from pydicom.data import get_testdata_file

            path = get_testdata_file(name, download=False)
        except Exception:  # noqa: BLE001 - no data source at all
            path = None
        if not path:
            raise UserError(f"--source real needs the pydicom-data package ({name} not found; "
                            "pip install pydicom-data)")
        ds, image = read_dicom(path)
        out.append(RealSource(file=name, pixels=image.pixels, full_scale=float((1 << int(ds.BitsStored)) - 1),
                              body_part=part, view=view, laterality=laterality, pixel_spacing_mm=spacing,
                              columns=columns))
    return tuple(out)


def _region(source: RealSource, split: str) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1) of ``split`` ("a", "b" or "test") in ``source``'s exposed field."""
    h = source.pixels.shape[0]
    c0, c1 = source.columns
    top, mid = int(round(h * TRAIN_ROWS)), (c0 + c1) // 2
    return {"a": (0, top, c0, mid), "b": (0, top, mid, c1), "test": (top, h, c0, c1)}[split]


def _collimate(crop: np.ndarray, full_scale: float, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """Collimator borders on 1..4 sides (each 4-15 % of the side, a 3 px soft edge), returned
    with their (side, width) list."""
    h, w = crop.shape
    sides = [s for s in ("top", "bottom", "left", "right") if rng.random() < 0.6] or ["left"]
    inside = np.ones_like(crop, dtype=np.float64)
    ys, xs = np.arange(h)[:, None] + 0.5, np.arange(w)[None, :] + 0.5
    borders: list[tuple[str, int]] = []
    for side in sides:
        n = h if side in ("top", "bottom") else w
        width = int(rng.integers(max(2, int(0.04 * n)), max(3, int(0.15 * n)) + 1))
        dist = {"top": ys - width, "bottom": h - width - ys, "left": xs - width, "right": w - width - xs}[side]
        inside = inside * np.clip(dist / 3.0 + 0.5, 0.0, 1.0)
        borders.append((side, width))
    level = COLLIMATED * full_scale * (1.0 - 0.01 * rng.random())
    shadow = level + 0.003 * full_scale * rng.standard_normal(crop.shape)
    out = inside * crop + (1.0 - inside) * np.minimum(shadow, full_scale)
    return out.astype(np.float32), borders


def real_crop(source: RealSource, split: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """A crop of ``source`` from ``split``'s region (module docstring): modality values, and a dict
    saying where it came from (for the manifest's reader: box, mirrored, collimator borders)."""
    r0, r1, c0, c1 = _region(source, split)
    lo = max(16, size // 2)
    rows = int(rng.integers(min(lo, r1 - r0), min(size, r1 - r0) + 1))
    cols = int(rng.integers(min(lo, c1 - c0), min(size, c1 - c0) + 1))
    y0 = int(rng.integers(r0, r1 - rows + 1))
    x0 = int(rng.integers(c0, c1 - cols + 1))
    crop = source.pixels[y0:y0 + rows, x0:x0 + cols]
    mirrored = bool(rng.random() < 0.5)
    if mirrored:
        crop = crop[:, ::-1]
    crop = np.ascontiguousarray(crop, dtype=np.float32)
    borders: list[tuple[str, int]] = []
    if rng.random() < 0.5:
        crop, borders = _collimate(crop, source.full_scale, rng)
    return crop, {"source": source.file, "box": [y0, x0, rows, cols], "mirrored": mirrored,
                  "collimator": borders}

"""Domain B's images on domain A's pixel size, where B's detector is of another pitch.

Why: a vendor's processing works at fixed sizes in pixels, and so do the first stage's band
curves and the network (``engine/pixel_spacing.py``). Where B's detector is finer than A's, the
same anatomy lies in coarser bands of B's pixels than of A's, and the fit reads that change of
scale as style; where it is coarser, the other way round. Resampled to A's pixel size, B's
images show anatomy at A's scale again. Measured with ``bench/pixel_pitch.py`` (first stage,
demo styles; ``bench/README.md``): a B of 1.5x finer pixels cost 3.1 to 12.7 dB and averaging
won back 2.4 to 11.9 on every pair and seed; a B of 1.45x coarser pixels cost the noise and
sharpness styles 9.5 to 13.3 dB, and bicubic interpolation up won back 8.5 to 14.5, at −1.1 to
+0.1 on the contrast styles, within the spread that B at A's own pitch shows against them.

The rule: with ``data.pixel_spacing: match`` (the default), when the domains' pixel sizes do
not overlap (``engine.pixel_spacing.finer_domain``: one domain's coarsest more than
:data:`~dicom_node.engine.pixel_spacing.SPACING_TOLERANCE` finer than the other's finest),
each image of B that names its size and lies more than that tolerance from A's median pixel
size is resampled to it bicubically: averaged when finer (antialiased), interpolated when
coarser; clamped to the image's own range, so no overshoot, and a pixel stays valid where
every source pixel the kernel reads was. B's detail above
its own detector's resolution is then missing, as it is in every image B's vendor made, and
the fit softens A's finest band. Images that name no size, and A's own, are left as they are.
Sizes that overlap are left alone: they are one detector's, or one mix of examinations whose
smaller fields have finer pixels in both domains. So is an image more than
:data:`MAX_RESAMPLING` from the target, or one that would pass the decoder's pixel limit
(``engine.radiograph.DEFAULT_MAX_PIXELS``): its header is more likely wrong than its detector
(an image interpolated 4x holds 16x the pixels), and the trainer warns about it. The model
then records B's sizes as resampled, and the log says how many were, and how.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from dicom_node.engine.pixel_spacing import SPACING_TOLERANCE, finer_domain, pixel_spacing_mm, spacing_range
from dicom_node.engine.radiograph import DEFAULT_MAX_PIXELS

__all__ = ["AVERAGED", "INTERPOLATED", "MAX_RESAMPLING", "left_alone", "pitch_target", "resampling",
           "to_pixel_size"]

AVERAGED, INTERPOLATED = "averaged", "interpolated"  # how an image came to the target size
# Pixel sizes further apart than this are left alone: 0.05 mm mammography plates against 0.2 mm
# radiography panels are 4x apart, so more is a header in error rather than a detector.
MAX_RESAMPLING = 4.0


def pitch_target(a_sizes: dict[str, float] | None, b_files: Sequence[Path]) -> float | None:
    """The pixel size (mm) B's images are resampled to by the rule, A's median, or None; B's sizes
    are read from the headers of ``b_files`` alone, before B is decoded."""
    b_sizes = spacing_range([_header_spacing(f) for f in b_files])
    return a_sizes["median"] if a_sizes is not None and finer_domain(a_sizes, b_sizes) is not None else None


def _header_spacing(path: Path) -> float | None:
    """One file's pixel size from its header; None for a raster or an unreadable file."""
    from pydicom import dcmread

    try:
        return pixel_spacing_mm(dcmread(path, stop_before_pixels=True, force=True))
    except Exception:  # noqa: BLE001 - PNG, TIFF, damaged: names no size (decoding will say why)
        return None


def resampling(own_mm: float | None, target_mm: float | None, shape: tuple[int, int] = (0, 0)) -> str | None:
    """How an image of ``own_mm`` pixels (and ``shape``) comes to ``target_mm`` by the rule:
    :data:`AVERAGED` (finer), :data:`INTERPOLATED` (coarser), or None (left alone: within the
    tolerance, further than :data:`MAX_RESAMPLING`, too large once interpolated, or a size unknown)."""
    if (own_mm is None or target_mm is None or not _apart(own_mm, target_mm, SPACING_TOLERANCE)
            or _apart(own_mm, target_mm, MAX_RESAMPLING)):
        return None
    if own_mm < target_mm:
        return AVERAGED
    return INTERPOLATED if shape[0] * shape[1] * (own_mm / target_mm) ** 2 <= DEFAULT_MAX_PIXELS else None


def left_alone(spacings: Sequence[float | None], target_mm: float) -> list[float]:
    """The pixel sizes, after loading, of B's images that the rule left more than the tolerance
    from ``target_mm`` (too far from it, or too large to interpolate), for a warning."""
    return [s for s in spacings if s is not None and _apart(s, target_mm, SPACING_TOLERANCE)]


def _apart(a_mm: float, b_mm: float, factor: float) -> bool:
    """Whether two pixel sizes lie more than ``factor`` apart."""
    return max(a_mm, b_mm) > factor * min(a_mm, b_mm)


def to_pixel_size(image: np.ndarray, valid: np.ndarray | None, own_mm: float,
                  target_mm: float) -> tuple[np.ndarray, np.ndarray | None]:
    """``image`` (and its valid mask) resampled from ``own_mm`` to ``target_mm`` pixels, bicubic
    (antialiased to coarser pixels: a weighted average over the output pixel's footprint) and
    clamped to the image's range; a pixel is valid where every source pixel the kernel reads was."""
    import torch
    import torch.nn.functional as F

    h, w = image.shape
    size = (max(1, round(h * own_mm / target_mm)), max(1, round(w * own_mm / target_mm)))
    t = torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None]
    shrink = own_mm < target_mm
    resized = F.interpolate(t, size=size, mode="bicubic", align_corners=False, antialias=shrink)
    out = resized.clamp(float(t.min()), float(t.max()))[0, 0].numpy()
    if valid is None:
        return out, None
    m = torch.from_numpy(np.ascontiguousarray(valid, np.float32))[None, None]
    reach = 2 * math.ceil(2 * max(1.0, target_mm / own_mm)) + 1  # the kernel's footprint in source pixels
    inner = -F.max_pool2d(-m, kernel_size=reach, stride=1, padding=reach // 2)  # valid with all it reaches
    if shrink:
        return out, F.interpolate(inner, size=size, mode="area")[0, 0].numpy() > 0.999
    return out, F.interpolate(inner, size=size, mode="nearest")[0, 0].numpy() > 0.5

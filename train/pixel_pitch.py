"""Domain B's images on domain A's pixel size, where B's detector is finer.

Why: a vendor's processing works at fixed sizes in pixels, and so do the first stage's band
curves and the network (``engine/pixel_spacing.py``). Where B's detector is finer than A's, the
same anatomy lies in coarser bands of B's pixels than of A's, and the fit reads that change of
scale as style. Averaged down to A's pixel size, B's images show anatomy at A's scale again.
Measured with ``bench/pixel_pitch.py`` (first stage, demo styles; ``bench/README.md``): a B of
1.5x finer pixels cost 3.1 to 12.7 dB and the averaging won back 2.4 to 11.7 on every pair and
seed. A B coarser than A is left alone, and the trainer warns: interpolating it up won back what
its pitch cost the noise and sharpness styles but cost the contrast styles up to 1.3 dB.

The rule: with ``data.pixel_spacing: match`` (the default), when B's pixels are all finer than
A's (``engine.pixel_spacing.finer_domain``: B's coarsest more than
:data:`~dicom_node.engine.pixel_spacing.SPACING_TOLERANCE` finer than A's finest), each image of
B that names its size is area-averaged to A's median pixel size (its valid mask with it: a pixel
stays valid where all it averages were); images that name no size, and A's own, are left as they
are. Sizes that overlap are left alone: they are one detector's, or one mix of examinations
whose smaller fields have finer pixels in both domains. The model then records B's sizes as
averaged, and the log says how many were.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from dicom_node.engine.pixel_spacing import SPACING_TOLERANCE, finer_domain, pixel_spacing_mm, spacing_range

__all__ = ["needs_resampling", "pitch_target", "to_pixel_size"]


def pitch_target(a_sizes: dict[str, float] | None, b_files: Sequence[Path]) -> float | None:
    """The pixel size (mm) B's images are averaged to by the rule, A's median, or None; B's sizes
    are read from the headers of ``b_files`` alone, before B is decoded."""
    b_sizes = spacing_range([_header_spacing(f) for f in b_files])
    return a_sizes["median"] if a_sizes is not None and finer_domain(a_sizes, b_sizes) == "B" else None


def _header_spacing(path: Path) -> float | None:
    """One file's pixel size from its header; None for a raster or an unreadable file."""
    from pydicom import dcmread

    try:
        return pixel_spacing_mm(dcmread(path, stop_before_pixels=True, force=True))
    except Exception:  # noqa: BLE001 - PNG, TIFF, damaged: names no size (decoding will say why)
        return None


def needs_resampling(own_mm: float | None, target_mm: float | None) -> bool:
    """Whether an image of ``own_mm`` pixels is averaged to ``target_mm`` by the rule."""
    return own_mm is not None and target_mm is not None and own_mm * SPACING_TOLERANCE < target_mm


def to_pixel_size(image: np.ndarray, valid: np.ndarray | None, own_mm: float,
                  target_mm: float) -> tuple[np.ndarray, np.ndarray | None]:
    """``image`` (and its valid mask) area-averaged from ``own_mm`` to ``target_mm`` pixels
    (each output pixel the mean of the input pixels its area touches: torch's adaptive average)."""
    import torch
    import torch.nn.functional as F

    h, w = image.shape
    size = (max(1, round(h * own_mm / target_mm)), max(1, round(w * own_mm / target_mm)))
    t = torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None]
    out = F.interpolate(t, size=size, mode="area")[0, 0].numpy()
    if valid is None:
        return out, None
    m = torch.from_numpy(np.ascontiguousarray(valid, np.float32))[None, None]
    return out, F.interpolate(m, size=size, mode="area")[0, 0].numpy() > 0.999

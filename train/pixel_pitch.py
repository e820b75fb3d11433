"""Domain B's images on domain A's pixel size, where B's detector is finer.

Why: a vendor's processing works at fixed sizes in pixels, and so do the first stage's band
curves and the network (``engine/pixel_spacing.py``). Where B's detector is finer than A's, the
same anatomy lies in coarser bands of B's pixels than of A's, and the fit reads that change of
scale as style. Averaged down to A's pixel size, B's images show anatomy at A's scale again.
Measured with ``bench/pixel_pitch.py`` (first stage, demo styles, B 1.5x finer than A): see
``bench/README.md``. A B coarser than A is left alone: interpolating it up did not win back
what its pitch cost.

The rule: with ``data.pixel_spacing: match`` (the default), each image of B whose pixels are
more than :data:`~dicom_node.engine.pixel_spacing.SPACING_TOLERANCE` finer than A's median is
area-averaged to A's median pixel size (its valid mask with it: a pixel stays valid where all it
averages were); images that name no size, and A's own, are left as they are. The model then
records B's sizes as resampled, and the log says how many were.
"""
from __future__ import annotations

import numpy as np

from dicom_node.engine.pixel_spacing import SPACING_TOLERANCE

__all__ = ["needs_resampling", "to_pixel_size"]


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

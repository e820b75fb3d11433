"""Image-quality metrics in model space, shared by ``dicom-node evaluate`` and training validation.

Definitions (data range 2, the width of model space [-1, 1]):

- ``psnr`` = 10 log10(2² / MSE) (dB);
- ``ssim``: Wang et al. 2004, 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, over
  the window positions fully inside the image;
- seams of a tiled pass against a whole-image pass of the same model (:func:`compare_seams`,
  pooled by :func:`seam_summary`): max and mean |tiled - whole| in % of the range, a
  ``seamless`` verdict against the engine's bounds, and the ``seam_ratio`` of border step
  energies (:func:`seam_energy`): 1 without seams, > 1 when the tiles leave steps that the
  whole image does not have.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .defaults import DEFAULT_OVERLAP

__all__ = ["DATA_RANGE", "psnr", "ssim", "SEAM_SEGMENT", "seam_energy", "SeamCheck", "compare_seams", "seam_summary"]

DATA_RANGE = 2.0  # model space is [-1, 1]


def psnr(x: np.ndarray, y: np.ndarray, data_range: float = DATA_RANGE) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical images."""
    mse = float(np.mean((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)


def _gauss_filter_valid(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation with a 1-D kernel along both axes."""
    k = len(kernel)
    rows: np.ndarray = sum(kernel[i] * img[i:img.shape[0] - k + 1 + i, :] for i in range(k))
    out: np.ndarray = sum(kernel[i] * rows[:, i:rows.shape[1] - k + 1 + i] for i in range(k))
    return out


def ssim(x: np.ndarray, y: np.ndarray, data_range: float = DATA_RANGE) -> float:
    """Mean SSIM (Gaussian 11x11, sigma 1.5, K1 0.01, K2 0.03; valid window positions)."""
    a = np.asarray(x, np.float64)
    b = np.asarray(y, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    if min(a.shape) < 11:
        raise ValueError("SSIM needs images of at least 11x11 pixels")
    c = np.arange(11) - 5.0
    g = np.exp(-(c * c) / (2 * 1.5**2))
    g /= g.sum()
    mu_a, mu_b = _gauss_filter_valid(a, g), _gauss_filter_valid(b, g)
    saa = _gauss_filter_valid(a * a, g) - mu_a**2
    sbb = _gauss_filter_valid(b * b, g) - mu_b**2
    sab = _gauss_filter_valid(a * b, g) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return float(s.mean())


SEAM_SEGMENT = 32  # px along a tile border averaged into one step (a seam is coherent along it, noise is not)


def seam_energy(change: np.ndarray, tile: int, overlap: float = DEFAULT_OVERLAP) -> tuple[float, int]:
    """Squared steps of ``change`` across the engine's tile borders: (sum, count).

    Where: the borders of tiles of ``tile`` px with ``overlap`` as the engine lays them out
    (:func:`dicom_node.engine.tiling.seam_lines`): blend zones of the overlapping output
    tiles and the grid edges of the full-resolution layers, rows and columns.

    What: the *band step* at a line ``c`` is mean(change[c:c+h]) - mean(change[c-h:c]) with
    ``h`` half the blend width (at least 4 px), so a tone change smeared over a blend zone
    counts in full; it is averaged over SEAM_SEGMENT px along the line, so a seam (coherent
    along the border) keeps its size while noise and texture shrink.

    The seam ratio divides this for the tiled output by the same for a whole-image pass of
    the same model: the same lines cross the same anatomy, so anatomy cancels (a reference
    taken from nearby lines did not: on seamless chests it read 1.5, from the spine that runs
    along the middle grid line).  Sums and counts pool over images before dividing.
    """
    from .tiling import seam_lines

    d = np.asarray(change, np.float64)
    total, count = 0.0, 0
    for img in (d, d.T):  # vertical borders (steps along x), then horizontal ones
        rows, n = img.shape
        seg = min(SEAM_SEGMENT, rows)
        k = rows // seg
        if k == 0:
            continue
        prof = img[:k * seg].reshape(k, seg, n).mean(axis=1)  # (segments, n)
        cum = np.concatenate([np.zeros((k, 1)), np.cumsum(prof, axis=1)], axis=1)
        for centre, width in seam_lines(n, tile, overlap):
            c, h = int(round(centre)), max(4, 4 * round(width / 8))
            if not h <= c <= n - h:
                continue
            step = ((cum[:, c + h] - cum[:, c]) - (cum[:, c] - cum[:, c - h])) / h
            total += float((step ** 2).sum())
            count += int(step.size)
    return total, count


@dataclass(frozen=True)
class SeamCheck:
    """One image's tiled pass compared with its whole-image pass (see :func:`compare_seams`)."""

    max_deviation: float  # max |tiled - whole|, % of the range
    mean_deviation: float  # mean |tiled - whole|, % of the range
    energy_tiled: float  # seam_energy of the tiled pass's change
    energy_whole: float  # the same lines in the whole-image pass


def compare_seams(x: np.ndarray, tiled: np.ndarray, whole: np.ndarray, tile: int, overlap: float) -> SeamCheck:
    """Deviation and border step energy of a tiled pass against the whole-image pass of ``x``."""
    dev = np.abs(np.asarray(tiled, np.float64) - whole) / DATA_RANGE * 100.0
    return SeamCheck(float(dev.max()), float(dev.mean()), seam_energy(tiled - x, tile, overlap)[0],
                     seam_energy(whole - x, tile, overlap)[0])


def seam_summary(checks: list[SeamCheck]) -> dict[str, Any]:
    """Pooled over images: ``seam_ratio`` (energies summed first; 1 when both are equal, e.g.
    0 for an identity model), ``seam_max_deviation`` (max), ``seam_mean_deviation`` (mean),
    ``seamless`` (both within the engine's bound)."""
    from .tiling import SEAMLESS_MAX_BOUND, SEAMLESS_MEAN_BOUND

    tiled = sum(c.energy_tiled for c in checks)
    whole = sum(c.energy_whole for c in checks)
    max_dev = max(c.max_deviation for c in checks)
    mean_dev = float(np.mean([c.mean_deviation for c in checks]))
    return {
        "seam_ratio": 1.0 if tiled == whole else (tiled / whole if whole > 0 else math.inf),
        "seam_max_deviation": max_dev,
        "seam_mean_deviation": mean_dev,
        "seamless": bool(max_dev <= 100 * SEAMLESS_MAX_BOUND and mean_dev <= 100 * SEAMLESS_MEAN_BOUND),
    }

"""Style statistics of radiographs, and a distance between two sets of them.

Why: without pairs there is no target to compare a translation with, but a style is a
*distribution*: its intensity histogram (tone), its local contrast at several scales (edge
enhancement, dynamic-range compression) and its noise power spectrum (noise reduction or
texture).  How far these statistics of G(A) are from B's tells, without a single pair,
whether a model produces the target look; the same number for A itself is the baseline.
``dicom-node train`` logs it at every checkpoint and keeps it in the exported model.

All statistics are pooled over a set of images (model space, [-1, 1]):

* ``quantiles``: 101 quantiles of the pooled intensities;
* ``band_energy``: mean squared coefficient of each octave band (``tone_filter.band_split``);
* ``spectrum``: radially averaged power spectrum in 12 log-spaced frequency bins (128-px
  windows from the image centre region, so image size does not change the estimate).

The distance adds three parts, each ~1 for "clearly another style":

* ``intensity``: 1-D Wasserstein distance of the intensity distributions / 0.05;
* ``contrast``: RMS over bands of |log2 amplitude ratio| (1 = a factor 2 in band amplitude);
* ``noise``: RMS over the upper half of the spectrum bins of |log2 amplitude ratio|.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence, cast

import numpy as np
import torch

from .tone_filter import DEFAULT_SIGMAS, band_split

__all__ = ["StyleStats", "style_statistics", "style_distance", "band_energies", "sample_pixels"]

N_QUANTILES = 101
N_SPECTRUM_BINS = 12
WINDOW = 128
INTENSITY_SCALE = 0.05  # model-space W1 distance that counts as 1


@dataclass
class StyleStats:
    """Pooled style statistics of a set of images (plain lists: JSON-serialisable)."""

    quantiles: list[float]
    band_energy: list[float]
    spectrum: list[float]
    images: int


def band_energies(image: np.ndarray | torch.Tensor, sigmas: Sequence[float] = DEFAULT_SIGMAS) -> np.ndarray:
    """Mean squared coefficient of each octave band of one image (2-D array or (1, 1, H, W))."""
    t = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.asarray(image, np.float32))[None, None]
    with torch.no_grad():
        bands = band_split(t, sigmas)
    return np.array([float((b.double() ** 2).mean()) for b in bands[:-1]])


def sample_pixels(images: Iterable[np.ndarray], per_image: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``per_image`` random pixels of each image (all of a smaller one), pooled, float64."""
    parts = []
    for img in images:
        flat = np.asarray(img).ravel()
        k = min(per_image, flat.size)
        parts.append(flat[rng.choice(flat.size, k, replace=False)] if k < flat.size else flat)
    return np.concatenate(parts).astype(np.float64)


def _spectrum(img: np.ndarray) -> np.ndarray:
    """Mean power in log-spaced radial frequency bins over WINDOW-sized tiles (Hann-windowed)."""
    h, w = img.shape
    win = min(WINDOW, h, w)
    hann = np.outer(np.hanning(win), np.hanning(win))
    fy = np.fft.fftfreq(win)[:, None]
    fx = np.fft.rfftfreq(win)[None, :]
    r = np.sqrt(fy * fy + fx * fx)
    edges = np.geomspace(1.0 / win, 0.5, N_SPECTRUM_BINS + 1)
    which = np.digitize(r, edges) - 1
    inside = (which >= 0) & (which < N_SPECTRUM_BINS)
    bins = which[inside]
    power = np.zeros(N_SPECTRUM_BINS)
    n = 0
    for y in range(0, h - win + 1, win):
        for x in range(0, w - win + 1, win):
            t = img[y:y + win, x:x + win].astype(np.float64)
            p = np.abs(np.fft.rfft2((t - t.mean()) * hann)) ** 2
            power += np.bincount(bins, weights=p[inside], minlength=N_SPECTRUM_BINS)
            n += 1
    counts = np.bincount(bins, minlength=N_SPECTRUM_BINS)
    return power / max(n, 1) / np.maximum(counts, 1)


def style_statistics(images: Iterable[np.ndarray], sigmas: Sequence[float] = DEFAULT_SIGMAS,
                     pixels_per_image: int = 100_000, seed: int = 0) -> StyleStats:
    """Pooled statistics of 2-D model-space images (any sizes)."""
    imgs = [np.asarray(img, dtype=np.float32) for img in images]
    if not imgs:
        raise ValueError("style statistics need at least one image")
    n = len(imgs)
    energy = cast(np.ndarray, sum(band_energies(img, sigmas) for img in imgs) / n)
    spectrum = cast(np.ndarray, sum(_spectrum(img) for img in imgs) / n)
    q = np.quantile(sample_pixels(imgs, pixels_per_image, np.random.default_rng(seed)), np.linspace(0, 1, N_QUANTILES))
    return StyleStats(quantiles=[float(v) for v in q], band_energy=[float(v) for v in energy],
                      spectrum=[float(v) for v in spectrum], images=n)


def _log2_ratio_rms(x: Sequence[float], y: Sequence[float]) -> float:
    a, b = np.maximum(np.asarray(x), 1e-12), np.maximum(np.asarray(y), 1e-12)
    return float(np.sqrt(np.mean((0.5 * np.log2(a / b)) ** 2)))  # 0.5: power -> amplitude


def style_distance(x: StyleStats, ref: StyleStats) -> dict[str, float]:
    """How far the style of ``x`` is from ``ref``: ``total`` and its three parts (see module doc)."""
    intensity = float(np.mean(np.abs(np.asarray(x.quantiles) - np.asarray(ref.quantiles)))) / INTENSITY_SCALE
    contrast = _log2_ratio_rms(x.band_energy, ref.band_energy)
    half = N_SPECTRUM_BINS // 2
    noise = _log2_ratio_rms(x.spectrum[half:], ref.spectrum[half:])
    total = intensity + contrast + noise
    return {"total": total, "intensity": intensity, "contrast": contrast, "noise": noise}

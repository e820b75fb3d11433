"""How far a set of images is from a domain's look: a sliced Wasserstein distance between the
joint distributions of their per-pixel band coefficients.

Why: without true pairs, the only evidence of a style is the target domain's own images.  A
vendor's look is a mapping of absolute values whose gain depends on the detail's scale, its
amplitude and its neighbourhood, so the evidence is in the *joint* distribution, at each pixel,
of the band-pass coefficients of an octave pyramid (sigma 0.7 ... 22.4 px) and the low-pass: a
translated image that has B's look has B's joint distribution.  Each image's features are
standardised by B's per-feature spread and projected on fixed random directions; the distance
is the mean squared difference of the projections' quantiles (a 1-D Wasserstein-2 per direction,
from quantiles so that it does not depend on how many pixels each side has).

Measured (bench/selection.py, the 63 stored networks of bench/quality.py's runs on 7 style
pairs, each against its own first stage): no unpaired network came more than +0.29 dB of
distance closer to B than its first stage (none beat it by more than 0.4 dB on true pairs
either); of the 13 networks more than 0.5 dB better in plain PSNR (12 of them trained on true
pairs) it rated 9 above the export's margin, the pseudo-pairs none (they rated such networks
down to -9.9 dB).  It ranks *different* models poorly (Spearman +0.10 to +0.95 over a pair's
models): the first stage is fitted to B's own images, so it is close to their sample by
construction, and a first stage fitted on images of the same content scored 7 dB better on
true pairs yet further from them (denoise).  Like the first stage it cannot see a content
difference between the domains (docs/training.md, "What the two domains must share").
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = ["SIGMAS", "BandDistance", "band_features", "pixel_features", "distance_gain_db"]

SIGMAS = (0.7, 1.4, 2.8, 5.6, 11.2, 22.4)  # the first stage's octave bands (px) and the widest it sees
SAMPLES = 60_000  # pixels per side, spread evenly over the images
PROJECTIONS = 256  # fixed random directions in the (bands + low-pass) feature space
QUANTILES = torch.linspace(0.005, 0.995, 199)


def pixel_features(x: torch.Tensor, sigmas: Sequence[float], margin: int) -> torch.Tensor:
    """``(pixels, len(sigmas) + 1)``: each pixel's band coefficients and low-pass for a batch
    ``x`` of shape ``(N, 1, H, W)``, ``margin`` pixels away from the border (whose blur is a
    reflection, not the image); differentiable, for losses on the same features."""
    from dicom_node.engine.tone_filter import band_split

    f = torch.cat(band_split(x, sigmas), dim=1)
    f = f[:, :, margin:f.shape[2] - margin, margin:f.shape[3] - margin]
    return f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])


def band_features(images: Sequence[np.ndarray], samples: int = SAMPLES, seed: int = 0) -> torch.Tensor:
    """``(pixels, len(SIGMAS) + 1)``: :func:`pixel_features` of up to ``samples`` pixels drawn
    evenly from ``images`` (model-space 2-D arrays)."""
    rng = np.random.default_rng(seed)
    per_image = max(1, samples // max(1, len(images)))
    out = []
    with torch.no_grad():
        for img in images:
            x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
            f = pixel_features(x, SIGMAS, min(int(2 * SIGMAS[-1]), min(x.shape[-2:]) // 4))
            keep = rng.choice(f.shape[0], min(per_image, f.shape[0]), replace=False)
            out.append(f[torch.from_numpy(keep)])
    return torch.cat(out)


class BandDistance:
    """The distance of any set of images from ``target`` images' joint band distribution (module
    doc); the target's features, spread and quantiles are measured once."""

    def __init__(self, target: Sequence[np.ndarray], seed: int = 0) -> None:
        features = band_features(target, seed=seed)
        self.scale = features.std(dim=0, keepdim=True).clamp_min(1e-6)
        gen = torch.Generator().manual_seed(seed)
        directions = torch.randn(features.shape[1], PROJECTIONS, generator=gen)
        self.directions = directions / directions.norm(dim=0, keepdim=True)
        self.target = self._quantiles(features)

    def _quantiles(self, features: torch.Tensor) -> torch.Tensor:
        return torch.quantile((features / self.scale) @ self.directions, QUANTILES, dim=0)

    def __call__(self, images: Sequence[np.ndarray]) -> float:
        with torch.no_grad():
            return float(((self._quantiles(band_features(images)) - self.target) ** 2).mean())


def distance_gain_db(first_stage: float, whole: float) -> float:
    """How much closer to the target the whole generator is than its first stage, in dB of the
    distance (``10 log10(first / whole)``: 0 when equal, +3 when the distance halves)."""
    return 10.0 * math.log10(max(first_stage, 1e-12) / max(whole, 1e-12))

"""Collimated borders of a training image, left out of the first stage's fit.

Why: the first stage (:mod:`.tone_fit`) matches the *distributions* of the two domains, and a
collimated border is a flat band of unexposed detector whose share of an image depends on how
the radiographer set the collimator, not on the vendor's processing.  Crops with and without
borders in different proportions in A and B moved the fitted tone curves: on the demo's crops
of real radiographs (``demo-data --source real``, half of them collimated) leaving the borders
out (from the crops' own records) gained +1.7 to +3.8 dB on seed 0, and detected as below +0.6
to +3.8 dB, 3 seeds (``bench/quality.py``, ``bench/results/quality-first-stage-real.json``).
Vendors' exposure recognition leaves them out of their histogram analysis for the same reason.

The rule, in model space (bone and unexposed detector bright): from each side inwards, rows
(columns) whose values are flat (standard deviation under :data:`FLAT` of the image's
0.5-99.5 percentile span) and near its top (mean within :data:`NEAR_TOP` of the span from the
99.5th percentile) are border, up to a third of the side; a found border is widened by
:data:`SOFT_EDGE` pixels, the collimator's penumbra.  Only straight borders along the image's
edges are found; a dark band (a direct-exposure background, or a vendor's black mask over the
collimated area) is kept: leaving out the background cost 13 dB on the demo phantoms, whose
tone curve then lacked the dark end.
"""
from __future__ import annotations

import numpy as np

__all__ = ["collimated_borders", "without_collimation", "FLAT", "NEAR_TOP", "SOFT_EDGE"]

FLAT = 0.03  # a border line's standard deviation, at most, as a share of the image's span
NEAR_TOP = 0.05  # a border line's mean, at least this close to the image's top, as a share of the span
SOFT_EDGE = 4  # pixels added to a found border: the collimator's penumbra
MAX_SHARE = 1 / 3  # of a side that may be border


def collimated_borders(image: np.ndarray) -> tuple[int, int, int, int]:
    """Widths of the collimated borders (top, bottom, left, right) in pixels; 0 where none."""
    lo, hi = np.percentile(image, [0.5, 99.5])
    span = max(float(hi - lo), 1e-6)

    def border(lines: np.ndarray) -> int:
        limit = int(lines.shape[0] * MAX_SHARE)
        n = 0
        while n < limit and lines[n].std() < FLAT * span and lines[n].mean() > hi - NEAR_TOP * span:
            n += 1
        return min(n + SOFT_EDGE, limit) if n else 0

    return border(image), border(image[::-1]), border(image.T), border(image.T[::-1])


def without_collimation(image: np.ndarray) -> np.ndarray:
    """``image`` without its collimated borders (a view)."""
    top, bottom, left, right = collimated_borders(image)
    return image[top:image.shape[0] - bottom, left:image.shape[1] - right]

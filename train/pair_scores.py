"""Scores against true pairs, shared by the first stage's fit and the checkpoint selection.

Why two kinds of error: what the node writes is judged as written (B's absolute values) and
as a look (after the best gain and offset, whatever the display window).  On the demo's real
crops the as-written error is about ten times the other (A's content sets where a
distribution-fitted level lands), so a score that pools them follows the level alone: a
network that moved the level right and spoilt the look scored +3 to +6 dB there and was
exported, 2.9 dB worse in look on held-out pairs than its first stage (bench/README.md).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dicom_node.engine.quality import DATA_RANGE

__all__ = ["EXACT_DB", "affine_fit", "pooled_affine", "pooled_error", "pooled_gain_db"]

EXACT_DB = 100.0  # PSNR of images equal to float32 rounding: the floor of every error


def affine_fit(out: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``out`` after the least-squares gain and offset onto ``target``."""
    design = np.stack([out.ravel(), np.ones(out.size)], 1)
    coef = np.linalg.lstsq(design, target.ravel(), rcond=None)[0]
    fitted: np.ndarray = (design @ coef).reshape(out.shape)
    return fitted


def pooled_affine(outs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """The one gain and offset that bring the outputs of every (output, target) pair closest to
    their targets: least squares with each pair weighing the same, as in :func:`pooled_error`
    (a large image does not outweigh the others)."""
    moments = np.zeros(5)  # E[o], E[t], E[o o], E[o t], per pair, then their mean
    for out, target in outs:
        o, t = np.asarray(out, np.float64).ravel(), np.asarray(target, np.float64).ravel()
        moments += [o.mean(), t.mean(), (o * o).mean(), (o * t).mean(), 1.0]
    mo, mt, moo, mot, n = moments
    mo, mt, moo, mot = mo / n, mt / n, moo / n, mot / n
    gain = (mot - mo * mt) / max(moo - mo * mo, 1e-12)
    return float(gain), float(mt - gain * mo)


def pooled_error(outs: Sequence[tuple[np.ndarray, np.ndarray]], *, look: bool) -> float:
    """The mean over (output, target) pairs of each squared error, as written or after
    :func:`affine_fit` (``look``), each floored at :data:`EXACT_DB`."""
    errors = []
    for out, target in outs:
        o, t = np.asarray(out, np.float64), np.asarray(target, np.float64)
        errors.append(max(float(np.mean(((affine_fit(o, t) if look else o) - t) ** 2)),
                          DATA_RANGE ** 2 * 10 ** (-EXACT_DB / 10)))
    return float(np.mean(errors))


def pooled_gain_db(better: Sequence[tuple[np.ndarray, np.ndarray]], worse: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """How much closer the ``better`` (output, target) pairs come than the ``worse`` ones, in dB:
    the ratio of their squared errors pooled over every pair, as written and as a look, whichever
    gains less.  Pooled, not a mean of each pair's PSNR difference, so that large gains on some
    pairs cannot hide one that is ruined; the lesser of the two kinds, so that a better level
    cannot hide a worse look, nor the reverse."""
    return min(float(10 * np.log10(pooled_error(worse, look=look) / pooled_error(better, look=look)))
               for look in (False, True))

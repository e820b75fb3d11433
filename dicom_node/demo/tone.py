"""Tone curves (gradation) shared by the linear and the nonlinear vendor styles.

Why a module of its own: :mod:`.vendor_processing` (linear styles, the pair registry) and
:mod:`.nonlinear_styles` both end their chains with the same curves, and the registry imports
the nonlinear pairs, so the curves cannot live in either without an import cycle.
"""
from __future__ import annotations

import numpy as np

__all__ = ["BITS", "PHOTOMETRICS", "TONE_CURVES", "tone_curve"]

BITS = 12  # the default bit depth of a style (BitsStored)
TONE_CURVES = ("gamma", "sigmoid", "log")
PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")


def tone_curve(u: np.ndarray, tone: str, k: float) -> np.ndarray:
    """``tone`` applied to ``u`` in [0, 1] (not clipped): ``gamma`` ``u**k``; ``sigmoid`` a
    logistic of gain ``k`` rescaled so 0 -> 0 and 1 -> 1 (an S-curve); ``log``
    ``log(1 + k u) / log(1 + k)`` (a logarithmic shoulder, dark tones lifted)."""
    if tone == "sigmoid":
        f = 1.0 / (1.0 + np.exp(-k * (u - 0.5)))
        f0, f1 = 1.0 / (1.0 + np.exp(k * 0.5)), 1.0 / (1.0 + np.exp(-k * 0.5))
        return (f - f0) / (f1 - f0)
    if tone == "log":
        return np.log1p(k * u) / np.log1p(k)
    return u ** k

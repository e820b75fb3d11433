"""Tone curves (gradation) shared by the linear and the nonlinear vendor styles.

Why a module of its own: :mod:`.vendor_processing` (linear styles, the pair registry) and
:mod:`.nonlinear_styles` both end their chains with the same curves, and the registry imports
the nonlinear pairs, so the curves cannot live in either without an import cycle.
"""
from __future__ import annotations

import numpy as np

__all__ = ["BITS", "PHOTOMETRICS", "TONE_CURVES", "tone_curve", "StoredOutput"]

BITS = 12  # the default bit depth of a style (BitsStored)
TONE_CURVES = ("gamma", "sigmoid", "log")
PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")


def tone_curve(u: np.ndarray, tone: str, k: float) -> np.ndarray:
    """``tone`` applied to ``u`` in [0, 1] (not clipped): ``gamma`` ``u**k``; ``sigmoid`` a
    logistic of gain ``k`` rescaled so 0 -> 0 and 1 -> 1 (an S-curve); ``log``
    ``log(1 + k u) / log(1 + k)`` (a logarithmic shoulder, dark tones lifted)."""
    curve: np.ndarray  # numpy's operators are typed Any
    if tone == "sigmoid":
        f = 1.0 / (1.0 + np.exp(-k * (u - 0.5)))
        f0, f1 = 1.0 / (1.0 + np.exp(k * 0.5)), 1.0 / (1.0 + np.exp(-k * 0.5))
        curve = (f - f0) / (f1 - f0)
    elif tone == "log":
        curve = np.log1p(k * u) / np.log1p(k)
    else:
        curve = u ** k
    return curve


class StoredOutput:
    """What every demo style shares about how it stores its output (a mixin of the style
    dataclasses, which declare ``name``, ``photometric``, ``tone`` and ``bits``): the checks of
    those fields and the largest stored value."""

    name: str
    photometric: str
    tone: str
    bits: int

    def __post_init__(self) -> None:
        if self.tone not in TONE_CURVES:
            raise ValueError(f"{self.name}: tone must be one of {TONE_CURVES}, not {self.tone!r}")
        if self.photometric not in PHOTOMETRICS:
            raise ValueError(f"{self.name}: photometric must be one of {PHOTOMETRICS}")
        if not 8 <= self.bits <= 16:
            raise ValueError(f"{self.name}: bits must be 8..16, not {self.bits}")

    @property
    def max_value(self) -> int:
        """The largest stored value (2**bits - 1)."""
        return (1 << self.bits) - 1

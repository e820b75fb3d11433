"""Two synthetic vendor post-processing styles applied to the same raw exposure.

Why: radiologists' style preferences are mostly the vendor's image processing, not the
anatomy.  Real processing chains (Agfa MUSICA, Fuji multi-frequency processing, Carestream
EVP...) share the same building blocks, which is what these two styles vary:

1. a *histogram window*: the anatomy's range of the raw log signal maps to 0..1;
2. *dynamic-range compression* (DRC): subtract part of a low-pass image, so lungs and
   mediastinum both fit the display range;
3. *multi-scale edge enhancement*: add back band-pass detail (unsharp masks at several
   scales), which also amplifies (re-textures) the quantum noise;
4. *noise reduction*: a blend with a slightly blurred image (a smoother noise texture);
5. a *tone curve* (gradation): gamma-like shoulder or a sigmoid S-curve;
6. 12-bit output, stored MONOCHROME1 (style A) or MONOCHROME2 (style B).

Style A, "Alpha soft": noise reduction, mild large-scale detail, gentle shoulder curve,
MONOCHROME1.  Style B, "Beta crisp": strong DRC, strong fine and medium edge enhancement,
no noise reduction, S-curve, MONOCHROME2.  All filter sizes are in detector pixels (the
processing runs on the pixel grid), so the same style maps apply at every image size.
Both are deterministic functions of the raw image: a perfect model could reproduce B
from A up to what the noise reduction in A destroyed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dicom_node.phantoms import gaussian_blur

__all__ = ["VendorStyle", "STYLE_A", "STYLE_B", "STYLES", "process", "to_stored"]

BITS = 12
MAX_VALUE = (1 << BITS) - 1


@dataclass(frozen=True)
class VendorStyle:
    """Parameters of one vendor's processing chain (see the module docstring for the order)."""

    key: str  # "A" or "B": the folder name
    name: str
    manufacturer: str
    model_name: str
    photometric: str  # how the 12-bit values are stored
    window_percentiles: tuple[float, float] = (1.0, 99.7)
    drc_sigma_px: float = 0.0
    drc_strength: float = 0.0  # fraction of the low-pass image subtracted
    edges: tuple[tuple[float, float], ...] = field(default_factory=tuple)  # (sigma px, gain) unsharp masks
    denoise_sigma_px: float = 0.0
    denoise_weight: float = 0.0  # 0 = none, 1 = fully blurred
    tone: str = "gamma"  # "gamma" (shoulder) or "sigmoid" (S-curve)
    tone_param: float = 1.0  # gamma exponent, or sigmoid gain

    def describe(self) -> dict:
        """The parameters as a plain dict (for docs and provenance)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


STYLE_A = VendorStyle(
    key="A", name="Alpha soft", manufacturer="Alpha Imaging (synthetic)", model_name="AlphaCR 3000",
    photometric="MONOCHROME1",
    edges=((6.0, 0.25),),
    denoise_sigma_px=1.0, denoise_weight=0.6,
    tone="gamma", tone_param=0.75,
)
STYLE_B = VendorStyle(
    key="B", name="Beta crisp", manufacturer="Beta Medical (synthetic)", model_name="BetaDR One",
    photometric="MONOCHROME2",
    drc_sigma_px=12.0, drc_strength=0.45,
    edges=((1.2, 0.8), (4.0, 0.5)),
    tone="sigmoid", tone_param=6.0,
)
STYLES = {"A": STYLE_A, "B": STYLE_B}


def process(raw: np.ndarray, style: VendorStyle) -> np.ndarray:
    """Apply a style to a raw log image; returns display values in [0, 1], bone bright."""
    lo, hi = np.percentile(raw, style.window_percentiles)
    u = (raw - lo) / max(hi - lo, 1e-6)
    if style.denoise_weight > 0:
        u = (1 - style.denoise_weight) * u + style.denoise_weight * gaussian_blur(u, style.denoise_sigma_px)
    if style.drc_strength > 0:
        low = gaussian_blur(u, style.drc_sigma_px)
        u = u - style.drc_strength * (low - float(np.mean(low)))
        lo2, hi2 = np.percentile(u, style.window_percentiles)  # re-window after compression
        u = (u - lo2) / max(hi2 - lo2, 1e-6)
    detail = np.zeros_like(u)
    for sigma, gain in style.edges:
        detail += gain * (u - gaussian_blur(u, sigma))
    u = np.clip(u + detail, 0.0, 1.0)
    if style.tone == "sigmoid":
        k = style.tone_param
        f = 1.0 / (1.0 + np.exp(-k * (u - 0.5)))
        f0, f1 = 1.0 / (1.0 + np.exp(k * 0.5)), 1.0 / (1.0 + np.exp(-k * 0.5))
        v = (f - f0) / (f1 - f0)
    else:
        v = u ** style.tone_param
    return np.clip(v, 0.0, 1.0)


def to_stored(display: np.ndarray, style: VendorStyle) -> np.ndarray:
    """12-bit stored values: MONOCHROME1 stores the inverse (low values display white)."""
    v = display if style.photometric == "MONOCHROME2" else 1.0 - display
    return np.round(v * MAX_VALUE).astype(np.uint16)

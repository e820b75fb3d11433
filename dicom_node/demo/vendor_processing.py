"""Synthetic vendor post-processing styles, and the pairs of them that demo-data writes.

Why: radiologists' style preferences are mostly the vendor's image processing, not the
anatomy.  Real processing chains (Agfa MUSICA, Fuji multi-frequency processing, Carestream
EVP...) share the same building blocks, which is what the styles vary:

1. a *histogram window*: the anatomy's range of the raw log signal maps to 0..1;
2. *dynamic-range compression* (DRC): subtract part of a low-pass image, so lungs and
   mediastinum both fit the display range;
3. *multi-scale edge enhancement*: add back band-pass detail (unsharp masks at several
   scales), which also amplifies (re-textures) the quantum noise; a very small scale is a
   high-frequency boost (a coarser, crisper grain);
4. *noise reduction*: a blend with a slightly blurred image (a smoother noise texture);
5. a *tone curve* (gradation): ``gamma`` (power law: < 1 a soft shoulder), ``sigmoid``
   (S-curve: more mid-tone contrast, compressed toe and shoulder) or ``log`` (a
   logarithmic shoulder, ``log(1 + k u) / log(1 + k)``: dark tones lifted strongly);
6. ``bits``-bit output (12 by default), stored MONOCHROME1 or MONOCHROME2.

The classic pair (``STYLES``, the bundled model's styles): style A, "Alpha soft": noise
reduction, mild large-scale detail, gentle shoulder curve, MONOCHROME1.  Style B, "Beta
crisp": strong DRC, strong fine and medium edge enhancement, no noise reduction, S-curve,
MONOCHROME2.  :data:`STYLE_PAIRS` adds pairs of graded difficulty (tone only; tone and
edges; tone, edges and noise texture; photometric; bit depth) and the nonlinear pairs of
:mod:`.nonlinear_styles` (``multiscale``, ``clahe``, ``denoise``, ``unsharp``, ``combined``:
absolute-value processing, no per-image window).  All filter sizes are in
detector pixels (the processing runs on the pixel grid), so the same style maps apply at
every image size.  Every style is a deterministic function of the raw image: a perfect
model could reproduce B from A up to what A's noise reduction, clipping and quantisation
destroyed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from dicom_node.demo.nonlinear_styles import NONLINEAR_PAIRS, NonlinearStyle
from dicom_node.demo.phantoms import gaussian_blur
from dicom_node.demo.tone import BITS, TONE_CURVES, StoredOutput, tone_curve
from dicom_node.errors import UserError

__all__ = ["VendorStyle", "NonlinearStyle", "StylePair", "STYLE_A", "STYLE_B", "STYLES", "STYLE_PAIRS", "DEFAULT_STYLE_PAIR",
           "TONE_CURVES", "get_style_pair", "process", "to_stored"]

MAX_VALUE = (1 << BITS) - 1  # the default bit depth's largest value (VendorStyle.max_value)


@dataclass(frozen=True)
class VendorStyle(StoredOutput):
    """Parameters of one vendor's processing chain (see the module docstring for the order)."""

    key: str  # "A" or "B": the folder name
    name: str
    manufacturer: str
    model_name: str
    photometric: str  # how the stored values are interpreted
    window_percentiles: tuple[float, float] = (1.0, 99.7)
    drc_sigma_px: float = 0.0
    drc_strength: float = 0.0  # fraction of the low-pass image subtracted
    edges: tuple[tuple[float, float], ...] = field(default_factory=tuple)  # (sigma px, gain) unsharp masks
    denoise_sigma_px: float = 0.0
    denoise_weight: float = 0.0  # 0 = none, 1 = fully blurred
    tone: str = "gamma"  # "gamma" (power law), "sigmoid" (S-curve) or "log" (log shoulder)
    tone_param: float = 1.0  # gamma exponent, sigmoid gain, or log k
    bits: int = BITS  # BitsStored; values 0 .. 2**bits - 1

    def describe(self) -> dict[str, Any]:
        """The parameters as a plain dict (for docs and provenance).

        ``bits`` is listed only when it differs from the 12-bit default, so the manifest of
        the classic pair stays byte-identical to the one written before ``bits`` existed.
        """
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        if d["bits"] == BITS:
            del d["bits"]
        return d


class StylePair(NamedTuple):
    """Two styles (folders A/ and B/) and a one-line description of how they differ."""

    a: VendorStyle | NonlinearStyle
    b: VendorStyle | NonlinearStyle
    description: str

    @property
    def styles(self) -> dict[str, VendorStyle | NonlinearStyle]:
        """Folder key -> style, A first."""
        return {self.a.key: self.a, self.b.key: self.b}


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
STYLES = {"A": STYLE_A, "B": STYLE_B}  # the classic pair (the bundled model's styles)

DEFAULT_STYLE_PAIR = "classic"

# Pairs of graded difficulty.  Within a pair only what the description names differs; the
# tone curve families, edge scales and DRC are deliberately varied across pairs.
STYLE_PAIRS: dict[str, StylePair] = {
    "classic": StylePair(
        STYLE_A, STYLE_B,
        "Alpha soft (denoise, sigma 6 detail, gamma 0.75, MONO1) vs Beta crisp (DRC, fine+medium edges, "
        "S-curve, MONO2): all differ"),
    "tone": StylePair(
        VendorStyle(
            key="A", name="Tau linear", manufacturer="Tau Radiology (synthetic)", model_name="TauCR 10",
            photometric="MONOCHROME2", window_percentiles=(0.5, 99.5),
            tone="gamma", tone_param=0.85,
        ),
        VendorStyle(
            key="B", name="Theta contrast", manufacturer="Theta Systems (synthetic)", model_name="ThetaDR 20",
            photometric="MONOCHROME2", window_percentiles=(2.0, 99.0),
            tone="sigmoid", tone_param=5.0,
        ),
        "tone curve only: window 0.5..99.5 % + gamma 0.85 vs 2..99 % + sigmoid gain 5; both MONO2, no filters"),
    "edges": StylePair(
        VendorStyle(
            key="A", name="Epsilon fine", manufacturer="Epsilon Imaging (synthetic)", model_name="EpsilonCR 5",
            photometric="MONOCHROME2",
            edges=((1.5, 0.5), (5.0, 0.3)),
            tone="log", tone_param=3.0,
        ),
        VendorStyle(
            key="B", name="Eta balanced", manufacturer="Eta Medical (synthetic)", model_name="EtaDR Flex",
            photometric="MONOCHROME2", window_percentiles=(0.5, 99.8),
            drc_sigma_px=20.0, drc_strength=0.55,
            edges=((3.0, 0.6), (10.0, 0.4)),
            tone="gamma", tone_param=1.15,
        ),
        "tone + edges: log shoulder, fine edges (sigma 1.5/5) vs strong DRC (sigma 20), coarse edges (3/10), "
        "gamma 1.15"),
    "noise": StylePair(
        VendorStyle(
            key="A", name="Nu smooth", manufacturer="Nu Diagnostics (synthetic)", model_name="NuCR Quiet",
            photometric="MONOCHROME2", window_percentiles=(1.0, 99.5),
            edges=((8.0, 0.3),),
            denoise_sigma_px=1.5, denoise_weight=0.7,
            tone="sigmoid", tone_param=4.5,
        ),
        VendorStyle(
            key="B", name="Xi grain", manufacturer="Xi Imaging (synthetic)", model_name="XiDR Sharp",
            photometric="MONOCHROME2",
            drc_sigma_px=10.0, drc_strength=0.35,
            edges=((0.7, 1.0), (2.5, 0.6)),
            tone="log", tone_param=2.0,
        ),
        "tone + edges + noise texture: 70 % denoise, sigma 8 detail, S-curve vs no denoise, high-frequency "
        "boost (sigma 0.7/2.5), DRC, log"),
    "mono": StylePair(
        VendorStyle(
            key="A", name="Omicron film", manufacturer="Omicron Healthcare (synthetic)", model_name="OmicronCR 2",
            photometric="MONOCHROME1",
            edges=((3.0, 0.4),),
            tone="gamma", tone_param=0.8,
        ),
        VendorStyle(
            key="B", name="Pi screen", manufacturer="Pi Medical (synthetic)", model_name="PiDR 7",
            photometric="MONOCHROME2",
            edges=((2.0, 0.55), (6.0, 0.25)),
            tone="sigmoid", tone_param=4.0,
        ),
        "MONOCHROME1 vs MONOCHROME2 (inverted storage) with a moderate difference: gamma 0.8 + sigma 3 edges "
        "vs S-curve + sigma 2/6 edges"),
    "bits": StylePair(
        VendorStyle(
            key="A", name="Rho compact", manufacturer="Rho Systems (synthetic)", model_name="RhoCR 10",
            photometric="MONOCHROME2", bits=10,
            edges=((2.0, 0.4),),
            tone="gamma", tone_param=0.9,
        ),
        VendorStyle(
            key="B", name="Sigma deep", manufacturer="Sigma Imaging (synthetic)", model_name="SigmaDR 15",
            photometric="MONOCHROME2", bits=15,
            drc_sigma_px=16.0, drc_strength=0.3,
            edges=((2.0, 0.5), (7.0, 0.25)),
            tone="log", tone_param=1.5,
        ),
        "10-bit vs 15-bit stored (both MONO2) with a moderate difference: gamma 0.9 vs light DRC, "
        "sigma 2/7 edges, log"),
}
# The nonlinear pairs (absolute values, no per-image window): dicom_node/demo/nonlinear_styles.py.
STYLE_PAIRS |= {name: StylePair(*pair) for name, pair in NONLINEAR_PAIRS.items()}


def get_style_pair(name: str) -> StylePair:
    """The pair called ``name``; a :class:`UserError` naming the choices otherwise."""
    try:
        return STYLE_PAIRS[name]
    except KeyError:
        raise UserError(f"unknown --style-pair {name!r} (choose from {', '.join(STYLE_PAIRS)})") from None


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
    shown: np.ndarray = np.clip(tone_curve(u, style.tone, style.tone_param), 0.0, 1.0)  # np.clip is typed Any
    return shown


def to_stored(display: np.ndarray, style: StoredOutput) -> np.ndarray:
    """``style.bits``-bit stored values: MONOCHROME1 stores the inverse (low values display white)."""
    v = display if style.photometric == "MONOCHROME2" else 1.0 - display
    return np.round(v * style.max_value).astype(np.uint16)

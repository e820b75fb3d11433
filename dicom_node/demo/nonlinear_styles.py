"""Nonlinear vendor styles: processing the way vendors make it, on absolute values.

Why: a vendor's look is a mapping of *absolute* detector values, and most of it is nonlinear:
the gain a detail gets depends on its amplitude and its neighbourhood.  The linear styles of
:mod:`.vendor_processing` stretch every image between its own percentiles, so a crop, a
collimator edge or another patient size moves their mapping; these styles do not.  Every
step works on ``u``, the source's values through a *fixed* window (:func:`phantom_scale`
for the phantoms' raw log signal, the stored range for real radiographs), and every
parameter is in those absolute units or in detector pixels:

1. *edge-preserving noise reduction* (:func:`bilateral`): neighbours are averaged with a
   weight that falls with their difference in value, so grain (small differences) is
   smoothed and edges (large ones) are kept;
2. *multiscale contrast equalisation* (:func:`multiscale_equalise`, MUSICA-like): a
   difference-of-Gaussians stack of octave bands; each coefficient ``c`` goes through a
   compander ``gain * c * (1 + (c/scale)**2) ** ((power - 1) / 2)``: small coefficients
   lifted by ``gain``, large ones compressed towards ``|c|**power``; the coarsest low-pass
   is compressed around the window's middle (dynamic-range compression);
3. *contrast-limited adaptive histogram equalisation* (:func:`clahe`): histograms of
   fixed-size tiles over fixed value bins, clipped at ``clip`` times the uniform count, the
   tile mappings interpolated bilinearly, blended with the input;
4. *unsharp masking with halo and clipping limits* (:func:`limited_unsharp`): the added
   detail saturates at ``halo`` (soft, tanh), and the result never leaves the
   neighbourhood's value range by more than ``overshoot``;
5. a tone curve (:mod:`.tone`) and ``bits``-bit storage, as the linear styles.

Everything is deterministic (no random numbers) and uses numpy only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from dicom_node.demo.phantoms import gaussian_blur
from dicom_node.demo.tone import BITS, StoredOutput, tone_curve

__all__ = ["NonlinearStyle", "NONLINEAR_PAIRS", "PHANTOM_FULL_SCALE", "phantom_scale", "process_nonlinear",
           "bilateral", "multiscale_equalise", "compand", "clahe", "limited_unsharp"]

# The raw log signal -ln(counts / unattenuated) that maps to u = 1, per body part: the
# vendor's exam menu (a header fact, not the image's content).  The phantoms' anatomy reaches
# about 5.8 (chest) and 3.5 (knee); 0 is unattenuated.
PHANTOM_FULL_SCALE = {"CHEST": 6.0, "KNEE": 4.0}


def phantom_scale(raw: np.ndarray, body_part: str) -> np.ndarray:
    """A phantom's raw log signal through its body part's fixed window: ``u = raw / full scale``."""
    return raw / PHANTOM_FULL_SCALE[body_part]


@dataclass(frozen=True)
class NonlinearStyle(StoredOutput):
    """One vendor's nonlinear chain; a step is off at its default.  Values in units of ``u``."""

    key: str  # "A" or "B": the folder name
    name: str
    manufacturer: str
    model_name: str
    photometric: str
    window: tuple[float, float] = (0.0, 1.0)  # fixed sub-window of u -> 0..1 (latitude)
    denoise_sigma_px: float = 0.0  # bilateral: spatial sigma (0 = off) ...
    denoise_range: float = 0.0  # ... and range sigma, absolute
    ms_levels: int = 0  # multiscale: octave bands (0 = off), finest sigma ms_sigma_px
    ms_sigma_px: float = 1.0
    ms_gain: float = 1.0  # gain of small coefficients
    ms_scale: float = 0.02  # amplitude where compression sets in
    ms_power: float = 1.0  # large coefficients grow as |c|**power
    ms_residual_gain: float = 1.0  # coarsest low-pass around 0.5 (< 1: dynamic-range compression)
    clahe_tile_px: int = 0  # CLAHE tile side (0 = off)
    clahe_clip: float = 2.0  # clip limit, times the uniform bin count (the largest local gain)
    clahe_weight: float = 1.0  # blend of the equalised image
    usm_sigma_px: float = 0.0  # unsharp mask (0 = off)
    usm_gain: float = 0.0
    usm_halo: float = 1.0  # largest detail added, absolute
    usm_overshoot: float = 1.0  # largest excursion beyond the neighbourhood's min/max
    usm_radius_px: int = 2  # that neighbourhood's radius
    tone: str = "gamma"
    tone_param: float = 1.0
    bits: int = BITS

    def describe(self) -> dict[str, Any]:
        """The parameters as a plain dict (for the manifest), the family named."""
        return {"family": "nonlinear", **{k: getattr(self, k) for k in self.__dataclass_fields__}}


# --------------------------------------------------------------------------- filters

def _shifts(img: np.ndarray, radius: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(dy, dx, view) for every offset within ``radius`` (square), reflected borders."""
    h, w = img.shape
    p = np.pad(img, radius, mode="reflect")
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            yield dy, dx, p[radius + dy:radius + dy + h, radius + dx:radius + dx + w]


def bilateral(u: np.ndarray, sigma_px: float, sigma_range: float) -> np.ndarray:
    """Bilateral filter: Gaussian in space (``sigma_px``) times Gaussian in value (``sigma_range``,
    absolute), so the smoothing a pixel gets depends on its neighbours' values."""
    radius = max(1, int(math.ceil(2.0 * sigma_px)))
    num = np.zeros_like(u, dtype=np.float64)
    den = np.zeros_like(num)
    for dy, dx, v in _shifts(u.astype(np.float64, copy=False), radius):
        d2 = dy * dy + dx * dx
        if d2 > radius * radius:
            continue
        wgt = math.exp(-d2 / (2.0 * sigma_px ** 2)) * np.exp(-np.square(v - u) / (2.0 * sigma_range ** 2))
        num += wgt * v
        den += wgt
    return num / den


def compand(c: np.ndarray, gain: float, scale: float, power: float) -> np.ndarray:
    """``gain * c * (1 + (c/scale)**2) ** ((power - 1) / 2)``: odd, smooth, slope ``gain`` at 0,
    growing as ``|c|**power`` far above ``scale`` (power < 1 compresses large coefficients)."""
    return gain * c * (1.0 + np.square(c / scale)) ** ((power - 1.0) / 2.0)


def multiscale_equalise(u: np.ndarray, levels: int, sigma_px: float, gain: float, scale: float, power: float,
                        residual_gain: float) -> np.ndarray:
    """Octave bands ``blur(u, s/2) - blur(u, s)`` for ``s = sigma_px * 2**k`` (the finest band is
    ``u - blur(u, sigma_px)``), each through :func:`compand`; the coarsest low-pass scaled by
    ``residual_gain`` around 0.5.  With gain 1, power 1 and residual gain 1 it returns ``u``."""
    out = np.zeros_like(u, dtype=np.float64)
    prev = u.astype(np.float64)
    for k in range(levels):
        low = gaussian_blur(u, sigma_px * 2.0 ** k)
        out += compand(prev - low, gain, scale, power)
        prev = low
    return out + 0.5 + residual_gain * (prev - 0.5)


def clahe(u: np.ndarray, tile_px: int, clip: float, bins: int = 256) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of ``u`` in [0, 1] (fixed bins over
    [0, 1], so a value means the same in every image).  Each ``tile_px`` tile's histogram is
    clipped at ``clip`` times the uniform count and the excess spread over all bins; its
    cumulative histogram is the tile's mapping, evaluated between bin centres and blended
    bilinearly between the four nearest tile centres."""
    h, w = u.shape
    ny, nx = -(-h // tile_px), -(-w // tile_px)
    x = np.clip(u, 0.0, 1.0)
    padded = np.pad(x, ((0, ny * tile_px - h), (0, nx * tile_px - w)), mode="reflect")
    b = np.minimum((padded * bins).astype(np.int64), bins - 1)
    tiles = b.reshape(ny, tile_px, nx, tile_px).transpose(0, 2, 1, 3).reshape(ny * nx, -1)
    hist = np.bincount((tiles + bins * np.arange(ny * nx)[:, None]).ravel(), minlength=ny * nx * bins)
    hist = hist.reshape(ny * nx, bins).astype(np.float64)
    limit = clip * tile_px * tile_px / bins
    excess = np.maximum(hist - limit, 0.0).sum(axis=1, keepdims=True)
    hist = np.minimum(hist, limit) + excess / bins
    cdf = np.cumsum(hist, axis=1)
    lut = ((cdf - 0.5 * hist) / cdf[:, -1:]).reshape(ny, nx, bins)  # value of each bin's centre
    # The pixel's position between bin centres, and between tile centres.
    pos = np.clip(x * bins - 0.5, 0.0, bins - 1.0)
    b0 = np.minimum(pos.astype(np.int64), bins - 2)
    fb = pos - b0

    def axis(n: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        f = (np.arange(n) + 0.5) / tile_px - 0.5
        i0 = np.clip(np.floor(f), 0, count - 1).astype(np.int64)
        return i0, np.minimum(i0 + 1, count - 1), np.clip(f - i0, 0.0, 1.0)

    y0, y1, wy = axis(h, ny)
    x0, x1, wx = axis(w, nx)
    y0, y1, wy = y0[:, None], y1[:, None], wy[:, None]

    def at(ty: np.ndarray, tx: np.ndarray) -> np.ndarray:
        mapped: np.ndarray = (1.0 - fb) * lut[ty, tx, b0] + fb * lut[ty, tx, b0 + 1]  # numpy's operators: Any
        return mapped

    top = (1.0 - wx) * at(y0, x0) + wx * at(y0, x1)
    bottom = (1.0 - wx) * at(y1, x0) + wx * at(y1, x1)
    blended: np.ndarray = (1.0 - wy) * top + wy * bottom
    return blended


def _local_extremes(u: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Minimum and maximum over the (2 radius + 1)² neighbourhood (separable, reflected borders)."""
    def run(img: np.ndarray, fn: Callable[[np.ndarray, np.ndarray], np.ndarray], ax: int) -> np.ndarray:
        pad = [(0, 0), (0, 0)]
        pad[ax] = (radius, radius)
        p = np.pad(img, pad, mode="reflect")
        n = img.shape[ax]
        out = np.take(p, range(0, n), axis=ax)
        for k in range(1, 2 * radius + 1):
            out = fn(out, np.take(p, range(k, k + n), axis=ax))
        return out
    return (run(run(u, np.minimum, 0), np.minimum, 1), run(run(u, np.maximum, 0), np.maximum, 1))


def limited_unsharp(u: np.ndarray, sigma_px: float, gain: float, halo: float, overshoot: float,
                    radius_px: int) -> np.ndarray:
    """``u + halo * tanh(gain * (u - blur(u)) / halo)`` (small details get ``gain``, the added
    detail never exceeds ``halo``), then clipped to the neighbourhood's min/max widened by
    ``overshoot`` (no bright or dark rim wider than that along an edge)."""
    detail = u - gaussian_blur(u, sigma_px)
    v = u + halo * np.tanh(gain * detail / halo)
    lo, hi = _local_extremes(u, radius_px)
    clipped: np.ndarray = np.clip(v, lo - overshoot, hi + overshoot)  # numpy's operators are typed Any
    return clipped


def process_nonlinear(u: np.ndarray, style: NonlinearStyle) -> np.ndarray:
    """Apply ``style`` to ``u`` (the source's values through its fixed window); returns display
    values in [0, 1], bone bright.  No statistic of the image itself is used."""
    lo, hi = style.window
    v = (np.asarray(u, dtype=np.float64) - lo) / (hi - lo)
    if style.denoise_sigma_px > 0:
        v = bilateral(v, style.denoise_sigma_px, style.denoise_range)
    if style.ms_levels > 0:
        v = multiscale_equalise(v, style.ms_levels, style.ms_sigma_px, style.ms_gain, style.ms_scale,
                                style.ms_power, style.ms_residual_gain)
    if style.clahe_tile_px > 0:
        v = (1.0 - style.clahe_weight) * v + style.clahe_weight * clahe(v, style.clahe_tile_px, style.clahe_clip)
    if style.usm_gain > 0:
        v = limited_unsharp(v, style.usm_sigma_px, style.usm_gain, style.usm_halo, style.usm_overshoot,
                            style.usm_radius_px)
    v = np.clip(v, 0.0, 1.0)
    shown: np.ndarray = np.clip(tone_curve(v, style.tone, style.tone_param), 0.0, 1.0)  # np.clip is typed Any
    return shown


# --------------------------------------------------------------------------- pairs

def _plain(name: str, manufacturer: str, model: str, **kw: Any) -> NonlinearStyle:
    """An A style: the same absolute window, only a tone curve (what the B styles add is theirs)."""
    return NonlinearStyle(key="A", name=name, manufacturer=manufacturer, model_name=model,
                          photometric=kw.pop("photometric", "MONOCHROME2"), **kw)


# name -> (style A, style B, one-line description).  Parameters chosen to look like moderate
# vendor defaults (identity PSNR in docs/demo-data.md), not fitted to any model.
NONLINEAR_PAIRS: dict[str, tuple[NonlinearStyle, NonlinearStyle, str]] = {
    "multiscale": (
        _plain("Kappa plain", "Kappa Imaging (synthetic)", "KappaCR 4", tone="gamma", tone_param=0.9),
        NonlinearStyle(
            key="B", name="Lambda multiscale", manufacturer="Lambda Medical (synthetic)", model_name="LambdaDR MX",
            photometric="MONOCHROME2",
            ms_levels=5, ms_sigma_px=1.0, ms_gain=1.8, ms_scale=0.02, ms_power=0.5, ms_residual_gain=0.6,
            tone="sigmoid", tone_param=3.0),
        "multiscale contrast equalisation: 5 octave bands, small coefficients x1.8, large ones ~|c|^0.5, "
        "low-pass x0.6; vs a plain gamma 0.9"),
    "clahe": (
        _plain("Mu plain", "Mu Systems (synthetic)", "MuCR 8", tone="log", tone_param=1.5),
        NonlinearStyle(
            key="B", name="Nu adaptive", manufacturer="Nu Radiology (synthetic)", model_name="NuDR Adapt",
            photometric="MONOCHROME2",
            clahe_tile_px=64, clahe_clip=2.5, clahe_weight=0.5,
            tone="gamma", tone_param=1.1),
        "adaptive histogram equalisation: CLAHE 64 px tiles, clip 2.5, 50 % blend, gamma 1.1; vs a plain log "
        "shoulder"),
    "denoise": (
        _plain("Phi plain", "Phi Diagnostics (synthetic)", "PhiCR 2", tone="gamma", tone_param=0.85),
        NonlinearStyle(
            key="B", name="Chi quiet", manufacturer="Chi Imaging (synthetic)", model_name="ChiDR Silent",
            photometric="MONOCHROME2",
            denoise_sigma_px=1.5, denoise_range=0.02,
            tone="sigmoid", tone_param=4.0),
        "edge-preserving noise reduction: bilateral sigma 1.5 px, range 0.02, S-curve; vs plain gamma 0.85"),
    "unsharp": (
        _plain("Psi plain", "Psi Healthcare (synthetic)", "PsiCR 6", tone="gamma", tone_param=1.0),
        NonlinearStyle(
            key="B", name="Omega sharp", manufacturer="Omega Medical (synthetic)", model_name="OmegaDR Edge",
            photometric="MONOCHROME2",
            usm_sigma_px=2.5, usm_gain=1.5, usm_halo=0.04, usm_overshoot=0.01, usm_radius_px=2,
            tone="log", tone_param=1.5),
        "unsharp mask sigma 2.5 px x1.5 with halo limit 0.04 and overshoot clip 0.01, log shoulder; vs linear"),
    "combined": (
        _plain("Upsilon film", "Upsilon Imaging (synthetic)", "UpsilonCR 1", photometric="MONOCHROME1",
               tone="gamma", tone_param=0.8),
        NonlinearStyle(
            key="B", name="Zeta full chain", manufacturer="Zeta Systems (synthetic)", model_name="ZetaDR Suite",
            photometric="MONOCHROME2",
            denoise_sigma_px=1.0, denoise_range=0.015,
            ms_levels=4, ms_sigma_px=1.5, ms_gain=1.5, ms_scale=0.03, ms_power=0.6, ms_residual_gain=0.7,
            clahe_tile_px=96, clahe_clip=2.0, clahe_weight=0.3,
            usm_sigma_px=1.0, usm_gain=0.8, usm_halo=0.03, usm_overshoot=0.01, usm_radius_px=1,
            tone="sigmoid", tone_param=3.5),
        "bilateral + multiscale (4 bands, x1.5, ~|c|^0.6, low-pass x0.7) + CLAHE 30 % + limited unsharp, "
        "S-curve, MONO2; vs gamma 0.8 MONO1"),
}

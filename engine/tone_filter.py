"""The global part of a style: tone curve, multi-scale band gains or band curves, tone curve.

Why: most of a vendor's look is global and linear-ish -- a gradation (tone) curve, dynamic
range compression and multi-scale edge enhancement (band gains), noise reduction (gains below
one at the finest scales).  All of it can be fitted from *unpaired* images of the two domains
by matching distributions (see ``dicom_node.train.tone_fit``): a tone curve by 1-D optimal
transport between the intensity histograms, a band gain by the ratio of the domains' band
energies.  A CycleGAN that has to discover this from an adversarial signal starts from noise
and, at small budgets, ends worse than returning the input (docs/training.md, "Why a plain CycleGAN
is not enough").  With this stage in front, the residual network only learns what a lookup table
and a linear filter cannot express.

    t = tone_in(x)                                   monotone curve, knots on [-1, 1]
    p = sum_k gain_k * (G_{s(k-1)} t - G_{s(k)} t) + G_{s(K)} t      (G_{s(0)} t = t)
    y = tone_out(p)                                  monotone curve, knots on [out_lo, out_hi]

With band curves (``band_knots > 0``) each band gets an odd, monotone curve instead of one gain,
``curve_k(c) = sign(c) f_k(|c|)``: the amplitude-dependent gains of multiscale contrast
equalisation (small coefficients lifted, large ones compressed), and coring (the smallest ones,
mostly noise, lowered) of wavelet noise reduction.  A curve is fitted like the tone curves, by
matching the distributions of ``|c|`` in the two domains, so it needs no pairs either.

``G_s`` is a Gaussian blur of sigma ``s`` detector pixels with reflected borders, computed by
FFT.  With gains 1 and identity curves the stage is exactly the identity.

Tiled inference: the stage has a support of several hundred pixels, so it is applied to the
whole (single-channel) image once, before the tiled executor runs the network; the whole-image
and the tiled paths therefore see the same bits (``engine.tiling``).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["ToneFilter", "DEFAULT_SIGMAS", "DEFAULT_KNOTS", "DEFAULT_BAND_KNOTS", "gaussian_blur", "band_split",
           "uniform_curve", "odd_curve"]

# Band edges in detector pixels: octaves from the finest texture to the scale of the lungs.
DEFAULT_SIGMAS: tuple[float, ...] = (0.7, 1.4, 2.8, 5.6, 11.2, 22.4, 44.8)
DEFAULT_KNOTS = 257
DEFAULT_BAND_KNOTS = 129  # knots of a band curve, at quantiles of |c|: dense where coefficients are
BAND_TABLE = 16384  # even samples of a band curve that inference reads (odd_curve)


def _fast_length(n: int) -> int:
    """The smallest length >= ``n`` with no prime factor above 7: FFTs of other lengths (a
    radiograph plus its reflected border is often 2 x a large prime) run several times slower."""
    while True:
        m = n
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _blurs(x: torch.Tensor, sigmas: Sequence[float]) -> list[torch.Tensor]:
    """Gaussian blurs of ``(N, 1, H, W)`` for each of ``sigmas``, by FFT, borders reflected (as
    the vendor filters do), sharing one forward transform.

    The reflection is ``min(ceil(3.5 max(sigmas)), side - 1)`` wide, widened (while the side
    allows) to a fast FFT length; beyond it the FFT wraps, which only matters for sigmas
    comparable to the image (then the blur is nearly the mean anyway).
    """
    h, w = x.shape[-2:]
    widest = max((s for s in sigmas if s > 0), default=0.0)
    pads = []
    for side in (h, w):
        pad = int(min(math.ceil(3.5 * widest), side - 1))
        extra = _fast_length(side + 2 * pad) - side - 2 * pad
        pads.append((pad, pad + extra) if pad + extra <= side - 1 else (pad, pad))
    (top, bottom), (left, right) = pads
    xp = torch.nn.functional.pad(x.float(), (left, right, top, bottom), mode="reflect") if top + left else x.float()
    hh, ww = xp.shape[-2:]
    spectrum = torch.fft.rfft2(xp)
    fy = torch.fft.fftfreq(hh, device=x.device, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(ww, device=x.device, dtype=torch.float64)[None, :]
    out = []
    for sigma in sigmas:
        if sigma <= 0:
            out.append(x)
            continue
        a = -2.0 * (math.pi * sigma) ** 2  # the Gaussian is separable: two 1-D exps, not one per frequency
        kernel = (torch.exp(a * fy * fy) * torch.exp(a * fx * fx)).to(torch.float32)
        blurred = torch.fft.irfft2(spectrum * kernel, s=(hh, ww))
        out.append(blurred[..., top:top + h, left:left + w].to(x.dtype))
    return out


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of ``(N, 1, H, W)`` by FFT, borders reflected (see :func:`_blurs`)."""
    return _blurs(x, [sigma])[0]


def band_split(x: torch.Tensor, sigmas: Sequence[float]) -> list[torch.Tensor]:
    """``len(sigmas)`` band-pass images (fine to coarse) plus the low-pass rest; they sum to ``x``."""
    bands, prev = [], x
    for low in _blurs(x, sigmas):
        bands.append(prev - low)
        prev = low
    bands.append(prev)
    return bands


def uniform_curve(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear curve through ``values`` at equally spaced knots on [lo, hi]; flat outside."""
    k = values.shape[0]
    u = ((x - lo) / (hi - lo)).clamp(0.0, 1.0) * (k - 1)
    i0 = u.floor().clamp(max=k - 2).long()
    frac = u - i0.to(u.dtype)
    return values[i0] + frac * (values[i0 + 1] - values[i0])


def _piecewise(a: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """The piecewise-linear curve through ``(xs, ys)`` at ``a`` (in ``[xs[0], xs[-1]]``)."""
    slope = (ys[1:] - ys[:-1]) / (xs[1:] - xs[:-1]).clamp_min(1e-12)
    i = (torch.searchsorted(xs, a.contiguous()) - 1).clamp(0, xs.shape[0] - 2)
    return torch.addcmul(ys[i], a - xs[i], slope[i])


def odd_curve(c: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """``sign(c) f(|c|)``, ``f`` piecewise linear through ``(xs, ys)`` (``xs`` increasing from 0);
    beyond ``xs[-1]`` the gain of the last knot, ``ys[-1] / xs[-1]``, goes on (a straight line
    through 0: the rare coefficients larger than any seen in training keep their proportion).

    Why a table: a search among the knots for each of a radiograph's millions of coefficients
    took 0.3 s per band at 2048^2 on one core; ``f`` is sampled once on :data:`BAND_TABLE`
    even steps (finer than the knots, which are densest near the median coefficient) and read
    like the tone curves, in a quarter of the time."""
    a = c.abs()
    end = xs[-1].clamp_min(1e-12)
    table = _piecewise(torch.linspace(0.0, 1.0, BAND_TABLE, device=c.device) * end, xs, ys)
    inside = uniform_curve(a, torch.zeros_like(end), end, table)
    return torch.where(a > end, a * (ys[-1] / end), inside).copysign(c)


class ToneFilter(nn.Module):
    """Tone curve -> band gains -> tone curve, on ``(N, 1, H, W)`` images in model space.

    The curves and gains are buffers: they are fitted from the training domains, not learned
    by gradient descent, and saved in the style model file with the generator's weights.
    """

    # the buffers (registered in __init__; band_x, band_y only with band curves)
    tone_in: torch.Tensor
    gains: torch.Tensor
    out_range: torch.Tensor
    tone_out: torch.Tensor
    band_x: torch.Tensor
    band_y: torch.Tensor

    def __init__(self, sigmas: Sequence[float] = DEFAULT_SIGMAS, knots: int = DEFAULT_KNOTS,
                 band_knots: int = 0) -> None:
        super().__init__()
        if knots < 2:
            raise ValueError("a tone curve needs at least 2 knots")
        if band_knots == 1 or band_knots < 0:
            raise ValueError("band curves need at least 2 knots (0: one gain per band)")
        self.sigmas = tuple(float(s) for s in sigmas)
        grid = torch.linspace(-1.0, 1.0, knots)
        self.register_buffer("tone_in", grid.clone())
        self.register_buffer("gains", torch.ones(len(self.sigmas)))
        self.register_buffer("out_range", torch.tensor([-1.0, 1.0]))
        self.register_buffer("tone_out", grid.clone())
        # Absent (not empty) without band curves, so files written before them load unchanged.
        self.band_curves = band_knots > 0
        if self.band_curves:
            identity = torch.linspace(0.0, 1.0, band_knots).repeat(len(self.sigmas), 1)
            self.register_buffer("band_x", identity.clone())
            self.register_buffer("band_y", identity.clone())

    @property
    def knots(self) -> int:
        return int(self.tone_in.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 whatever the caller's precision: a bf16 curve would be quantised to ~1/256.
        dtype, x = x.dtype, x.float()
        one = torch.ones((), dtype=x.dtype, device=x.device)
        t = uniform_curve(x, -one, one, self.tone_in.float())
        curves = self.band_curves and not torch.equal(self.band_x, self.band_y)  # else the gains, if any
        if curves or bool((self.gains != 1).any()):
            bands = band_split(t, self.sigmas)
            t = bands[-1]
            for k, b in enumerate(bands[:-1]):
                t = t + (odd_curve(b, self.band_x[k].float(), self.band_y[k].float()) if curves
                         else self.gains[k].float() * b)
        lo, hi = self.out_range.float()
        return uniform_curve(t, lo, hi, self.tone_out.float()).to(dtype)

    def architecture(self) -> dict[str, Any]:
        arch: dict[str, Any] = {"sigmas": list(self.sigmas), "knots": self.knots}
        if self.band_curves:  # absent in files written before band curves: they load as before
            arch["band_knots"] = int(self.band_x.shape[1])
        return arch

    def describe(self) -> dict[str, Any]:
        """Human-readable summary (``dicom-node model info``): with band curves, each band's gain
        for a small coefficient (the median one) and a large one (the largest knot)."""
        out: dict[str, Any] = {"band_sigmas_px": list(self.sigmas)}
        if not self.band_curves:
            return out | {"band_gains": [round(float(g), 3) for g in self.gains]}
        mid = self.band_x.shape[1] // 2
        small = self.band_y[:, mid] / self.band_x[:, mid].clamp_min(1e-12)
        large = self.band_y[:, -1] / self.band_x[:, -1].clamp_min(1e-12)
        return out | {"band_gains_small": [round(float(g), 3) for g in small],
                      "band_gains_large": [round(float(g), 3) for g in large]}

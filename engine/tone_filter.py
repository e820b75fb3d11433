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

With brightness bins (``brightness_bins = M > 1``) a band has M curves, one per band of local
brightness (the rank of the low-pass ``G_{s(K)} t`` among the source domain's), blended
linearly between the bins' centres: a detail's gain then depends on its amplitude *and* on
where it sits on the grey scale.  Why: the detail processing seen through the model's grey
scale is not the same everywhere on it.  A vendor's amplitude-dependent processing acts in its
own grey scale, whose slope against the one the bands are split in varies with brightness, so
the same detail is lifted differently in dense and in thin regions; noise and texture differ
between them too, and one curve per band matches only their mixture (``bench/quality.py``,
over one curve per band: +0.35 to +1.9 dB on 6 of the 8 phantom style pairs, -0.1 and -0.4
on the other 2; -0.2 to -0.6 dB on the 5 pairs of crops of real radiographs, where A and B
show different anatomy and more curves fit more of that difference).

With local tone curves (``local_bins = L > 1``, off by default) the output goes on through L
tone curves, one per band of local brightness (the rank of ``G_{local_sigma} y`` among the
source domain's), blended linearly between the bins' centres:

    y' = sum_l w_l(rank(G_sigma y)) * local_l(y)

Why: adaptive equalisation and strong dynamic-range compression map the same value
differently in a dark and in a bright neighbourhood, and an odd band curve cannot shift a
region's level.  Each curve matches the distribution of values whose neighbourhood ranks near
its bin in each domain.  Measured on demo data of 3 seeds (``bench/local_tone.py``, 8 bins,
mean over seeds): +2.4 dB on ``multiscale``, +0.8 on ``combined``, +0.4 on ``clahe`` over the
stage without them, -0.03 to +0.4 on the linear and denoising pairs (worst image -0.5), but
-0.1 to -1.3 on the 5 pairs of crops of real radiographs, whose domains show different
anatomy (worst image -2.3): a conditional distribution holds more of the content than a
marginal one.  Hence off unless asked for: ``dicom-node train`` asks for them when validation
pairs can check them, or when told that the domains show the same exams.

``G_s`` is a Gaussian blur of sigma ``s`` detector pixels with reflected borders, computed by
FFT.  With gains 1 and identity curves the stage is exactly the identity.

Tiled inference: the stage has a support of several hundred pixels, so it is applied to the
whole (single-channel) image once, before the tiled executor runs the network; the whole-image
and the tiled paths therefore see the same bits (``engine.tiling``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["ToneFilter", "DEFAULT_SIGMAS", "DEFAULT_KNOTS", "DEFAULT_BAND_KNOTS", "DEFAULT_BRIGHTNESS_BINS",
           "BRIGHTNESS_KNOTS", "DEFAULT_LOCAL_SIGMA", "gaussian_blur", "band_split", "uniform_curve", "binned_uniform_curve", "odd_curve",
           "binned_odd_curve"]

# Band edges in detector pixels: octaves from the finest texture to the scale of the lungs.
DEFAULT_SIGMAS: tuple[float, ...] = (0.7, 1.4, 2.8, 5.6, 11.2, 22.4, 44.8)
DEFAULT_KNOTS = 257
DEFAULT_BAND_KNOTS = 129  # knots of a band curve, at quantiles of |c|: dense where coefficients are
BAND_TABLE = 16384  # even samples of a band curve that inference reads (odd_curve)
DEFAULT_BRIGHTNESS_BINS = 4  # band curves per band, by local brightness (8 lost up to 1.2 dB on denoising styles)
BRIGHTNESS_KNOTS = 65  # quantiles of the source domain's low-pass that give a pixel its brightness rank
MAX_BRIGHTNESS_BINS = 64  # also the most local tone curves
DEFAULT_LOCAL_SIGMA = 24.0  # px: a local tone curve's neighbourhood (48 lost up to 1.6 dB on the demo pairs)


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
    return _read_odd(c, *_odd_table(xs, ys))


def _odd_table(xs: torch.Tensor, ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`odd_curve`'s table of ``f`` on [0, end], ``end``, and the gain beyond it."""
    end = xs[-1].clamp_min(1e-12)
    table = _piecewise(torch.linspace(0.0, 1.0, BAND_TABLE, device=xs.device) * end, xs, ys)
    return table, end, ys[-1] / end


def _read_odd(c: torch.Tensor, table: torch.Tensor, end: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    a = c.abs()
    inside = uniform_curve(a, torch.zeros_like(end), end, table)
    return torch.where(a > end, a * gain, inside).copysign(c)


def binned_odd_curve(c: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Like :func:`odd_curve` with one curve per brightness bin (``xs``, ``ys``: ``(M, knots)``,
    ``M >= 2``), blended linearly at each pixel's fractional bin ``position`` in ``[0, M - 1]``.

    All bins are sampled on one common even grid up to the largest last knot (beyond its own
    last knot a bin keeps its last gain, as :func:`odd_curve` does), so each coefficient is read
    with one bilinear lookup in an ``(M, BAND_TABLE)`` table instead of M curve evaluations."""
    return _read_binned(c, position, *_binned_table(xs, ys))


def _binned_table(xs: torch.Tensor, ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`binned_odd_curve`'s ``(M * BAND_TABLE,)`` table, its ``end``, each bin's last gain."""
    last_x = xs[:, -1].clamp_min(1e-12)
    last_gain = ys[:, -1] / last_x
    end = last_x.max()
    grid = torch.linspace(0.0, 1.0, BAND_TABLE, device=xs.device) * end
    table = torch.stack([torch.where(grid > lx, grid * g, _piecewise(grid.clamp(max=lx), x, y))
                         for x, y, lx, g in zip(xs, ys, last_x, last_gain)])
    return table.reshape(-1), end, last_gain


def _read_binned(c: torch.Tensor, position: torch.Tensor, table: torch.Tensor, end: torch.Tensor,
                 last_gain: torch.Tensor) -> torch.Tensor:
    a = c.abs()
    bins, n = last_gain.shape[0], BAND_TABLE
    u = (a / end).clamp(max=1.0) * (n - 1)
    i0 = u.floor().clamp(max=n - 2).long()
    frac = u - i0.to(u.dtype)
    m0 = position.floor().clamp(0, bins - 2).long()
    w = position - m0.to(position.dtype)
    idx = m0 * n + i0
    low = torch.lerp(table[idx], table[idx + 1], frac)
    high = torch.lerp(table[idx + n], table[idx + n + 1], frac)
    inside = torch.lerp(low, high, w)
    beyond = a * torch.lerp(last_gain[m0], last_gain[m0 + 1], w)
    return torch.where(a > end, beyond, inside).copysign(c)


class ToneFilter(nn.Module):
    """Tone curve -> band gains -> tone curve, on ``(N, 1, H, W)`` images in model space.

    The curves and gains are buffers: they are fitted from the training domains, not learned
    by gradient descent, and saved in the style model file with the generator's weights.
    """

    # the buffers (registered in __init__; band_x, band_y only with band curves, brightness
    # only with brightness bins)
    tone_in: torch.Tensor
    gains: torch.Tensor
    out_range: torch.Tensor
    tone_out: torch.Tensor
    band_x: torch.Tensor
    band_y: torch.Tensor
    brightness: torch.Tensor
    local_levels: torch.Tensor
    local_range: torch.Tensor
    local_curves: torch.Tensor

    def __init__(self, sigmas: Sequence[float] = DEFAULT_SIGMAS, knots: int = DEFAULT_KNOTS,
                 band_knots: int = 0, brightness_bins: int = 1, local_bins: int = 1,
                 local_sigma: float = DEFAULT_LOCAL_SIGMA) -> None:
        super().__init__()
        if knots < 2:
            raise ValueError("a tone curve needs at least 2 knots")
        if band_knots == 1 or band_knots < 0:
            raise ValueError("band curves need at least 2 knots (0: one gain per band)")
        if not 1 <= brightness_bins <= MAX_BRIGHTNESS_BINS or (brightness_bins > 1 and not band_knots):
            raise ValueError(f"brightness_bins must be 1..{MAX_BRIGHTNESS_BINS}, and above 1 only with band curves")
        if not 1 <= local_bins <= MAX_BRIGHTNESS_BINS or not 0.0 < local_sigma <= 1024.0:
            raise ValueError(f"local_bins must be 1..{MAX_BRIGHTNESS_BINS} and local_sigma in (0, 1024] px")
        self.sigmas = tuple(float(s) for s in sigmas)
        grid = torch.linspace(-1.0, 1.0, knots)
        self.register_buffer("tone_in", grid.clone())
        self.register_buffer("gains", torch.ones(len(self.sigmas)))
        self.register_buffer("out_range", torch.tensor([-1.0, 1.0]))
        self.register_buffer("tone_out", grid.clone())
        # Absent (not empty) without band curves, so files written before them load unchanged.
        self.band_curves = band_knots > 0
        # Without brightness bins the curves are (bands, knots), as in files written before them.
        self.brightness_bins = brightness_bins
        self._tables: tuple[tuple[Any, ...], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] | None = None
        if self.band_curves:
            shape = (len(self.sigmas), brightness_bins) if brightness_bins > 1 else (len(self.sigmas),)
            identity = torch.linspace(0.0, 1.0, band_knots).repeat(*shape, 1)
            self.register_buffer("band_x", identity.clone())
            self.register_buffer("band_y", identity.clone())
        if brightness_bins > 1:  # the source domain's low-pass at even quantile levels (tone_fit)
            self.register_buffer("brightness", torch.linspace(-1.0, 1.0, BRIGHTNESS_KNOTS))
        # Local tone curves: absent (not identity buffers) when off, so files written before them
        # load unchanged.  Identity on [-1, 1] until fitted, where tone_out, unfitted, is flat.
        self.local_bins, self.local_sigma = local_bins, float(local_sigma)
        if local_bins > 1:
            self.register_buffer("local_levels", torch.linspace(-1.0, 1.0, BRIGHTNESS_KNOTS))
            self.register_buffer("local_range", torch.tensor([-1.0, 1.0]))
            self.register_buffer("local_curves", grid.repeat(local_bins, 1))

    @property
    def knots(self) -> int:
        return int(self.tone_in.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.before_local_tone(x)
        return (self.local_tone(y) if self.local_tone_changes() else y).to(x.dtype)

    def local_tone_changes(self) -> bool:
        """Whether the stage has local tone curves and they change anything.  Identity curves
        (not fitted yet, or left out by the trainer's validation pairs) are skipped, as identity
        band curves are: they would triple the stage's time for nothing (1024² on one core:
        90 against 285 ms)."""
        if self.local_bins <= 1:
            return False
        lo, hi = self.local_range.float()
        grid = torch.linspace(0.0, 1.0, self.local_curves.shape[1], device=lo.device) * (hi - lo) + lo
        return not torch.allclose(self.local_curves.float(), grid.expand_as(self.local_curves), rtol=0.0, atol=1e-6)

    def before_local_tone(self, x: torch.Tensor) -> torch.Tensor:
        """The stage up to its output tone curve, in float32: what the local tone curves, if any,
        read (and are fitted on)."""
        # float32 whatever the caller's precision: a bf16 curve would be quantised to ~1/256.
        x = x.float()
        one = torch.ones((), dtype=x.dtype, device=x.device)
        t = uniform_curve(x, -one, one, self.tone_in.float())
        curves = self.band_curves and not torch.equal(self.band_x, self.band_y)  # else the gains, if any
        if curves or bool((self.gains != 1).any()):
            bands = band_split(t, self.sigmas)
            t = bands[-1]
            curve = self._band_curve(t) if curves else None
            for k, b in enumerate(bands[:-1]):
                t = t + (curve(k, b) if curve else self.gains[k].float() * b)
        lo, hi = self.out_range.float()
        return uniform_curve(t, lo, hi, self.tone_out.float())

    def local_tone(self, y: torch.Tensor) -> torch.Tensor:
        """The local tone curves on ``y`` (the output of the stage before them), blended at each
        pixel's bin of local brightness (module doc)."""
        position = _bin_position(gaussian_blur(y, self.local_sigma), self.local_levels.float(), self.local_bins)
        lo, hi = self.local_range.float()
        return binned_uniform_curve(y, lo, hi, self.local_curves.float(), position)

    def _band_curve(self, low: torch.Tensor) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """Band ``k``'s curve as a function of its coefficients; with brightness bins, at the
        bins given by the low-pass ``low`` of the same image."""
        tables = self._band_tables()
        if self.brightness_bins == 1:
            return lambda k, c: _read_odd(c, *tables[k])
        position = self.brightness_position(low)
        return lambda k, c: _read_binned(c, position, *tables[k])

    def _band_tables(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Each band's curve table, built once per set of curves: rebuilding the tables took
        more time than reading them on a training patch (7 bands x 16384 samples a call)."""
        key = (self.band_x._version, self.band_y._version, self.band_x.data_ptr(), self.band_y.data_ptr(),
               self.band_x.device, torch.is_inference_mode_enabled())
        if self._tables is None or self._tables[0] != key:
            build = _binned_table if self.brightness_bins > 1 else _odd_table
            self._tables = (key, [build(x.float(), y.float()) for x, y in zip(self.band_x, self.band_y)])
        return self._tables[1]

    def architecture(self) -> dict[str, Any]:
        arch: dict[str, Any] = {"sigmas": list(self.sigmas), "knots": self.knots}
        if self.band_curves:  # absent in files written before band curves: they load as before
            arch["band_knots"] = int(self.band_x.shape[-1])
        if self.brightness_bins > 1:  # likewise
            arch["brightness_bins"] = self.brightness_bins
        if self.local_bins > 1:  # likewise
            arch |= {"local_bins": self.local_bins, "local_sigma": self.local_sigma}
        return arch

    def brightness_position(self, low: torch.Tensor) -> torch.Tensor:
        """Each pixel's fractional brightness bin in ``[0, M - 1]`` from the low-pass ``low``: its
        rank among the source domain's low-pass values (:attr:`brightness`, at even quantile
        levels), bin ``m`` centred on rank ``(m + 1/2) / M``."""
        return _bin_position(low, self.brightness.float(), self.brightness_bins)

    def describe(self) -> dict[str, Any]:
        """Human-readable summary (``dicom-node model info``): with band curves, each band's gain
        for a small coefficient (the median one) and a large one (the largest knot)."""
        out: dict[str, Any] = {"band_sigmas_px": list(self.sigmas)}
        if self.local_bins > 1:
            out["local_tone"] = {"bins": self.local_bins, "sigma_px": self.local_sigma,
                                 "identity": not self.local_tone_changes()}  # left out: skipped
        if not self.band_curves:
            return out | {"band_gains": [round(float(g), 3) for g in self.gains]}
        xs, ys = self.band_x, self.band_y  # (bands, knots), or (bands, bins, knots)
        mid = xs.shape[-1] // 2
        small = ys[..., mid] / xs[..., mid].clamp_min(1e-12)
        large = ys[..., -1] / xs[..., -1].clamp_min(1e-12)
        if self.brightness_bins > 1:  # per band and bin (dark to bright), then each band's mean
            out |= {"brightness_bins": self.brightness_bins,
                    "band_gains_small_by_brightness": [_rounded(row) for row in small]}
            small, large = small.mean(-1), large.mean(-1)
        return out | {"band_gains_small": _rounded(small), "band_gains_large": _rounded(large)}


def _bin_position(low: torch.Tensor, quantiles: torch.Tensor, bins: int) -> torch.Tensor:
    """Each pixel's fractional bin in ``[0, bins - 1]`` from its neighbourhood's value ``low``: its
    rank among the source domain's (``quantiles``, at even levels), bin ``m`` centred on rank
    ``(m + 1/2) / bins``."""
    levels = torch.linspace(0.0, 1.0, quantiles.shape[0], device=low.device)
    rank = _piecewise(low.clamp(quantiles[0], quantiles[-1]), quantiles, levels)  # tensor bounds: no host sync
    return (rank * bins - 0.5).clamp(0.0, bins - 1.0)


def binned_uniform_curve(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, values: torch.Tensor,
                         position: torch.Tensor) -> torch.Tensor:
    """Like :func:`uniform_curve` with one curve per bin (``values``: ``(M, knots)``, ``M >= 2``),
    blended linearly at each pixel's fractional bin ``position`` in ``[0, M - 1]``: one bilinear
    lookup in the flattened table instead of M curve evaluations."""
    bins, k = values.shape
    u = ((x - lo) / (hi - lo)).clamp(0.0, 1.0) * (k - 1)
    i0 = u.floor().clamp(max=k - 2).long()
    frac = u - i0.to(u.dtype)
    m0 = position.floor().clamp(0, bins - 2).long()
    w = position - m0.to(position.dtype)
    table, idx = values.reshape(-1), m0 * k + i0
    low = torch.lerp(table[idx], table[idx + 1], frac)
    high = torch.lerp(table[idx + k], table[idx + k + 1], frac)
    return torch.lerp(low, high, w)


def _rounded(values: torch.Tensor) -> list[float]:
    return [round(float(v), 3) for v in values]

"""The fidelity guard: does a restyled radiograph still show its source's anatomy?

Why: a GAN translation can invent or erase structure (a "hallucination"), most often on
inputs unlike its training data, and a broken model file may load and run.  A style changes
tone, sharpness and noise, never the anatomy, so the guard compares every output with its
own source, per image, and names what it finds:

* ``structure``, ``band_structure`` and ``unexplained``: the output is predicted from the
  source by what a style does to a whole image: a monotone tone fit (histogram matching,
  which cannot turn an inverted image upright), a least-squares gain per Laplacian band
  (sharpening, smoothing) and a second monotone fit (the output curve, which clips
  sharpening's overshoots).  What the prediction misses is what the model did locally.
  ``structure`` is the worst 9x9 region of ``E(residual) / (E(prediction) + E(output) + c)``
  on all the detail, box-smoothed so noise texture averages out: ~0 where the output follows
  the source, ~1 where one of them has structure the other lacks (a painted nodule, an
  erased region), so one region counts, not the mean.  ``band_structure`` is the same per
  band (an edge erased at one scale).  ``unexplained`` is the residual's share of the
  output's detail over the whole image (~0.03 for a style, ~1 for noise or an inverted
  image).  Regions the source shows clipped to black or white are not judged.
* ``cycle``: the share of the source's detail that the inverse model's translation of the
  output, ``F(G(x))``, does not restore (only when the inverse model is known).  It runs on
  a reduced image (longest side :data:`CYCLE_SIDE`) to keep its cost small; calibration
  absorbs the scale change.
* ``network``: what the model's network added beyond its global stage (``engine.tone_filter``:
  tone curves and band gains, which act on the whole image alike and cannot draw a nodule),
  or beyond the source for a model without one.  A GAN invents or erases structure only
  there.  Per pyramid band, the worst 9x9 region's RMS of that addition and the worst share
  of the global stage's structure it took away (its sign: an erased edge, which may be no
  stronger than a network's normal edge enhancement), and the worst region of its
  box-smoothed local mean (a blob); each divided by the highest value seen on the model's
  calibration images (``metadata.fidelity.network_scale``, written at export), the score is
  the largest of these ratios: ~1 for what the network normally does, several for a painted
  nodule or an erased edge.  Only for models calibrated with it.
* ``ood``: the input's style distance (``engine.style_stats``, the trainer's statistics) to
  the nearest image of the model's training domain, recorded in the model at export: inputs
  unlike the training data (another body part, another detector) are where models fail.
* ``noise``: the input's noise level (a robust estimate from second differences) against the
  nearest training image's, as ``|log2|`` of their ratio: another detector or dose that the
  global style distance overlooks where the style has strong fine detail of its own.
* ``saturated``: the share of the image (per cent) that is saturated white with a surround
  (the mean of its unsaturated neighbours) darker than the training domain's (the domain's
  0.1 % quantile, recorded at export): metal implants, a plateau with a step all round even
  over bright bone, which the ``structure`` scores cannot judge (clipped regions are
  skipped) and which change the global statistics little.
* ``window``: the share of the input (per cent of its valid pixels) outside the model's fixed
  input window, clipped on the way in (``engine.radiograph``): an input whose values are not
  the ones the model was trained on (another detector, bit depth, exposure or processing) is
  translated from a flattened copy.  Only for fixed-window models.
  ``noise``, ``saturated`` and ``network`` are only judged for models calibrated with them
  (older model files skip them, and ``saturated`` for calibrations before fidelity version 5,
  which measured the darkest single neighbour; there are no defaults).

A calibration names the weights it measured (``metadata.fidelity.weights_sha256``): when the
model's weights are others (fine-tuned, converted, or damaged and saved again with a new file
digest), every output is flagged, since no threshold was ever measured for them.

All are "higher is worse" and compared with thresholds: the model's calibrated ones
(``metadata.fidelity.thresholds``, written by the trainer at export) or the
conservative :data:`DEFAULT_THRESHOLDS`.  Scores are computed on an area-downsampled copy
(longest side :data:`ANALYSIS_SIDE`): anatomy lives at that scale, and the cost stays a
few per cent of a translation (``bench/fidelity.py`` measures it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .style_stats import StyleStats, style_distance, style_statistics
from .tone_filter import uniform_curve

if TYPE_CHECKING:
    from .model_file import StyleModel

__all__ = ["FidelityReport", "assess", "structure_scores", "ood_score", "cycle_score", "judge", "thresholds_of",
           "calibrate_thresholds", "domain_statistics", "analysis_view", "disagreement", "noise_level", "noise_score",
           "saturated_level", "saturated_score", "window_share", "fixed_window", "network_levels", "network_score", "network_addition", "base_of",
           "DEFAULT_THRESHOLDS", "SCORES", "ANALYSIS_SIDE", "CYCLE_SIDE", "OK", "FLAGGED"]

OK, FLAGGED = "ok", "flagged"
STALE_CALIBRATION = "the model's weights changed since its calibration (re-export it: dicom-node train export)"
SCORES = ("structure", "band_structure", "unexplained", "network", "cycle", "ood", "noise", "saturated",
          "window")  # higher: worse
STRUCTURE_SCORES = ("structure", "band_structure", "unexplained")  # from source and output alone
ANALYSIS_SIDE = 512
CYCLE_SIDE = 128
LEVELS = 5  # pyramid bands for the style's gains: structures of 1-32 analysis pixels
SMOOTH = 5  # box smoothing of all detail together: incoherent noise texture averages out
SKIP_LEVELS = 2  # per band, the finest two (1-4 analysis pixels) are noise texture, which styles change
WINDOW = 9  # the region size judged, analysis pixels (~ a nodule)
BAND_WINDOW = 9  # the same per band, in the band's own (coarser) pixels
STABILISER = 1.0  # c, in units of the output's mean detail energy: flat regions count as agreeing
CLIPPED = 0.98  # |model-space value| from which the source counts as clipped (normalize clips at 1)
SATURATED_QUANTILE = 1e-3  # the domain's darkest surrounds of saturation: their 0.1 % quantile (see saturated_level)
NOISE_FLOOR = 1e-4  # model-space sigma below which noise levels are not told apart (~ a 14-bit step)
NETWORK_FLOOR = 1e-3  # model-space RMS under which a network's addition counts as none (~0.05 % of the range)
ERASED_FLOOR = 0.1  # share of a region's structure a network may take away unjudged (x 1.5: 15 %)
BLOB_WINDOWS = (5, 33)  # analysis pixels: a blob is a local mean of the addition over 5 against its 33 surround
TONE_TABLE = 4097  # entries of the tone fit's lookup table
SURROUND_WINDOW = 5  # analysis pixels around a saturated pixel whose unsaturated ones are its surround
# Uncalibrated models (older files, ``model init``): loose enough that a plausible style never
# trips them, tight enough for the gross faults (inverted, random, blank, broken model).
# ``noise`` and ``saturated`` have none: they need the domain's statistics, so only calibrated models judge them.
DEFAULT_THRESHOLDS: dict[str, float] = {"structure": 0.75, "band_structure": 0.75, "unexplained": 0.5, "cycle": 0.5,
                                        "ood": 3.0, "window": 20.0}
# Calibration: the highest held-out score plus a margin, the larger of an absolute one and one
# relative to that score.  Whole-image scores (unexplained, cycle, ood) get a wide relative
# margin: a few dozen calibration images do not show their tail (measured, bench/fidelity.py).
# ``noise``: at least half an octave beyond the spread of the domain; ``saturated``: at least
# 0.05 % of the image; ``window``: twice the highest share seen, at least 5 % of the image more.
# ``network`` is a ratio to its own calibration (1.0 at most there): half as much again.
MARGIN_ABS: dict[str, float] = {"structure": 0.1, "band_structure": 0.1, "unexplained": 0.1, "network": 0.5,
                                "cycle": 0.1, "ood": 1.0, "noise": 0.5, "saturated": 0.05, "window": 5.0}
MARGIN_REL: dict[str, float] = {"structure": 0.35, "band_structure": 0.35, "unexplained": 1.0, "network": 0.0,
                                "cycle": 1.0, "ood": 1.0, "noise": 1.0, "saturated": 1.0, "window": 1.0}


@dataclass
class FidelityReport:
    """The guard's finding for one output: ``verdict`` ok/flagged, with the reasons."""

    verdict: str
    reasons: list[str] = field(default_factory=list)
    scores: dict[str, float | None] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    calibrated: bool = False
    worst_region: tuple[int, int] | None = None  # (row, column) in source pixels, for previews

    @property
    def flagged(self) -> bool:
        return self.verdict == FLAGGED

    def summary(self) -> str:
        """One line for ImageComments, previews and status: the verdict and its reasons."""
        return self.verdict if not self.reasons else f"{self.verdict}: {'; '.join(self.reasons)}"

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "reasons": list(self.reasons), "scores": dict(self.scores),
                "thresholds": dict(self.thresholds), "calibrated": self.calibrated}


def analysis_view(image: np.ndarray, valid: np.ndarray | None = None, side: int = ANALYSIS_SIDE) -> np.ndarray:
    """``image`` area-downsampled by an integer factor to a longest side <= ``side``.

    Padding (``valid`` False) is filled with the median of the valid pixels first, so the
    same fill in source and output carries no structure.
    """
    img = np.asarray(image, dtype=np.float32)
    if valid is not None and not valid.all():
        img = img.copy()
        img[~valid] = float(np.median(img[valid])) if valid.any() else 0.0
    factor = max(1, -(-max(img.shape) // side))
    if factor == 1:
        return img
    t = torch.from_numpy(np.ascontiguousarray(img))[None, None]
    return F.avg_pool2d(t, factor, ceil_mode=True, count_include_pad=False)[0, 0].numpy()


def _quantiles(a: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``np.quantile(a, q)`` (linear), from one sort: several times faster for hundreds of ``q``."""
    s = np.sort(a, axis=None)
    return np.interp(q * (s.size - 1), np.arange(s.size), s)


def _tone_fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``x`` mapped onto ``y``'s intensity distribution by a monotone (increasing) curve.

    The curve is evaluated through a uniform table of :data:`TONE_TABLE` entries (``np.interp``
    on a whole image is a binary search per pixel, the guard's largest cost; the table's
    error is ~1e-5 of the range).
    """
    q = np.linspace(0.0, 1.0, 257)
    qx, qy = _quantiles(x[::2, ::2], q), _quantiles(y[::2, ::2], q)  # a quarter of the pixels is plenty
    qx = qx + np.arange(qx.size) * 1e-7  # strictly increasing knots even on flat histograms
    lo, hi = float(qx[0]), float(qx[-1])
    table = torch.from_numpy(np.interp(np.linspace(lo, hi, TONE_TABLE), qx, qy).astype(np.float32))
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return uniform_curve(t, torch.tensor(lo), torch.tensor(hi), table).numpy()


def _pyramid(t: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Laplacian pyramid: band-pass levels (finest first) and the low-pass rest."""
    bands, g = [], t
    for _ in range(LEVELS):
        if min(g.shape[-2:]) < 4:
            break
        low = F.avg_pool2d(g, 2, ceil_mode=True)
        bands.append(g - F.interpolate(low, size=g.shape[-2:], mode="bilinear", align_corners=False))
        g = low
    return bands, g


def _box(t: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over a k x k window (separable, reflected at the border), by running sums in float64
    (equal to average pooling to float32 rounding; stride-1 pooling is slower on a CPU)."""
    p = min(k // 2, t.shape[-1] - 1, t.shape[-2] - 1)
    n = 2 * p + 1
    for dim, pad in ((-1, (p, p, 0, 0)), (-2, (0, 0, p, p))):
        u = F.pad(t, pad, mode="reflect").double().cumsum(dim)
        u = torch.cat([torch.zeros_like(u.narrow(dim, 0, 1)), u], dim)
        length = u.shape[dim] - n
        t = ((u.narrow(dim, n, length) - u.narrow(dim, 0, length)) / n).float()
    return t


def _judgeable(x: np.ndarray) -> torch.Tensor:
    """1 where the source shows anatomy: not clipped to black or white (nothing to compare there)."""
    clipped = torch.from_numpy((np.abs(x) >= CLIPPED).astype(np.float32))[None, None]
    return (_box(clipped, WINDOW) == 0).float()  # no clipped pixel within a window


def disagreement(x: np.ndarray, y: np.ndarray, *, output_curve: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The local disagreement maps of two analysis images, and the unexplained fraction.

    The output is predicted from the source as a style acts on a whole image (the order of
    ``engine.tone_filter``): a monotone tone fit, a least-squares gain per pyramid band, and a
    second monotone fit onto the output's intensities (its output curve, which flattens
    sharpening's overshoots at the ends of the range; ``output_curve`` False: without it, as
    the cycle check compares).  What the prediction misses, the residual,
    is what the model did locally.  Per window, ``E(r) / (E(p) + E(y) + c)`` (energies of the
    residual, the prediction and the output): near 0 where the output follows the source,
    near 1 where one of them has structure the other lacks.  Two maps: ``structure`` on all
    the detail together, box-smoothed so incoherent noise texture averages out (a painted
    blob stands out there), and ``band_structure``, the maximum over the bands from the
    third on (an edge erased at a fine scale counts even where a coarse one is kept).
    """
    xt = torch.from_numpy(_tone_fit(x, y))[None, None]
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))[None, None]
    bx, low = _pyramid(xt)
    by, _ = _pyramid(yt)
    gains = [max(0.0, float((a * b).sum() / (a * a).sum().clamp_min(1e-12))) for a, b in zip(bx, by)]
    size = yt.shape[-2:]

    def up(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False)

    def full(bands: list[torch.Tensor], rest: torch.Tensor | None = None) -> torch.Tensor:
        g = torch.zeros_like(low) if rest is None else rest  # the bands' sum at full resolution
        for band in reversed(bands):
            g = F.interpolate(g, size=band.shape[-2:], mode="bilinear", align_corners=False) + band
        return g

    def ratio(r: torch.Tensor, p: torch.Tensor, b: torch.Tensor, k: int = WINDOW) -> torch.Tensor:
        c = STABILISER * float(b.pow(2).mean().clamp_min(1e-12))
        return _box(r * r, k) / (_box(p * p, k) + _box(b * b, k) + c)

    # A style's output curve comes after its band gains (engine.tone_filter) and flattens what
    # sharpening pushes beyond the output range: a second monotone fit, of the gained
    # prediction onto the output, says so (else clipped undershoots read as differences).
    if output_curve:
        p = full([g * a for g, a in zip(gains, bx)], low)[0, 0].numpy()
        bx, _ = _pyramid(torch.from_numpy(_tone_fit(p, y))[None, None])
    else:
        bx = [g * a for g, a in zip(gains, bx)]
    p_all, y_all = full(bx), full(by)
    sp, sy = _box(p_all, SMOOTH), _box(y_all, SMOOTH)
    judge = _judgeable(x)
    local = ratio(sy - sp, sp, sy) * judge
    bands = torch.zeros_like(local)
    for level in range(SKIP_LEVELS, len(bx)):
        bands = torch.maximum(bands, up(ratio(by[level] - bx[level], bx[level], by[level], BAND_WINDOW)))
    unexplained = float((y_all - p_all).pow(2).mean() / y_all.pow(2).mean().clamp_min(1e-12))
    return local, bands * judge, unexplained


def structure_scores(x: np.ndarray, y: np.ndarray, *, output_curve: bool = True) -> dict[str, float]:
    """``structure`` (worst region), ``unexplained`` (global) and ``structure_mean`` of two
    same-shape analysis images (``output_curve``: see :func:`disagreement`)."""
    return _structure(x, y, output_curve=output_curve)[0]


def _structure(x: np.ndarray, y: np.ndarray, *, output_curve: bool = True
               ) -> tuple[dict[str, float], tuple[int, int]]:
    """The structure scores and the (row, column) of the worst region, in analysis pixels."""
    if x.shape != y.shape:
        raise ValueError("source and output must have the same shape")
    if min(x.shape) < 2 * WINDOW:
        raise ValueError(f"images smaller than {2 * WINDOW} pixels cannot be judged")
    local, bands, unexplained = disagreement(x, y, output_curve=output_curve)
    worst_map = local if float(local.max()) >= float(bands.max()) else bands
    worst = divmod(int(torch.argmax(worst_map)), local.shape[-1])
    return {"structure": float(local.max()), "band_structure": float(bands.max()), "unexplained": unexplained,
            "structure_mean": float(local.mean())}, worst


def domain_statistics(images: list[np.ndarray]) -> list[StyleStats]:
    """The training domain as the guard measures inputs: each image's style statistics at
    analysis scale (a domain is often several kinds of image, chests and knees, so an input is
    compared with its nearest training image, not with one pooled average)."""
    return [style_statistics([analysis_view(img)]) for img in images]


def ood_score(x_small: np.ndarray, domain: list[StyleStats]) -> float:
    """Style distance of one (analysis-scale) input to the nearest image of its model's domain."""
    own = style_statistics([x_small])
    return min(float(style_distance(own, ref)["total"]) for ref in domain)


def noise_level(x_small: np.ndarray, valid: np.ndarray | None = None) -> float:
    """The noise standard deviation of an analysis image, robustly: the median absolute second
    difference along rows (edges are rare, so they barely move a median), over pixels that are
    neither clipped nor padding, scaled to a Gaussian's sigma."""
    x = np.asarray(x_small, dtype=np.float32)
    d2 = x[:, 2:] - 2.0 * x[:, 1:-1] + x[:, :-2]  # variance 6 sigma^2 for white noise
    use = (np.abs(x[:, 2:]) < CLIPPED) & (np.abs(x[:, 1:-1]) < CLIPPED) & (np.abs(x[:, :-2]) < CLIPPED)
    if valid is not None:
        use &= valid[:, 2:] & valid[:, 1:-1] & valid[:, :-2]
    v = np.abs(d2[use])
    return float(np.median(v) / 0.6745 / np.sqrt(6.0)) if v.size else 0.0


def noise_score(level: float, domain_levels: list[float]) -> float:
    """``|log2|`` of the ratio of an input's noise level to the nearest training image's (levels
    below :data:`NOISE_FLOOR` count as the floor: noise-free synthetic or quantised-flat images)."""
    return min(abs(float(np.log2(max(level, NOISE_FLOOR) / max(d, NOISE_FLOOR)))) for d in domain_levels)


def _saturated_surround(x_small: np.ndarray) -> np.ndarray:
    """For each saturated-white pixel with unsaturated pixels within :data:`SURROUND_WINDOW`, their
    mean: how dark the surround of saturation is.

    Natural saturation (the brightest anatomy, cut off by the percentile window) mostly fades
    into white: most of its unsaturated neighbours are nearly white, though a few may be dark
    where a bone edge is steep.  Metal is a plateau with a step all round: its neighbours are
    the anatomy's grey on every side.  The mean weighs them all where the darkest single
    neighbour (the measure before fidelity version 5) takes the steepest: on a real CR chest
    that missed 3 of 40 implants over the bright abdomen, whose step is no steeper than a
    clipped bone edge's; the mean missed none (bench/fidelity.py).
    """
    x = np.asarray(x_small, dtype=np.float32)
    sat = x >= CLIPPED
    if not sat.any():
        return np.zeros(0, dtype=np.float32)
    open_ = ~sat
    t = torch.from_numpy(np.stack([np.where(open_, x, 0.0), open_]).astype(np.float32))[:, None]
    total, count = _box(t, SURROUND_WINDOW)[:, 0].numpy()
    rim = sat & (count > 0.5 / SURROUND_WINDOW ** 2)  # at least one unsaturated pixel in the window
    return total[rim] / count[rim]


def saturated_level(images_small: list[np.ndarray]) -> float:
    """The training domain's darkest surrounds of saturation: the :data:`SATURATED_QUANTILE` of
    :func:`_saturated_surround` over all its saturated pixels (``CLIPPED`` when it has none:
    then any saturated region with a darker surround counts)."""
    values = [_saturated_surround(x) for x in images_small]
    pooled = np.concatenate(values) if values else np.zeros(0)
    return float(np.quantile(pooled, SATURATED_QUANTILE)) if pooled.size else CLIPPED


def saturated_score(x_small: np.ndarray, level: float) -> float:
    """Per cent of the image that is saturated white with a surround darker than ``level``."""
    return 100.0 * float((_saturated_surround(x_small) < level).sum()) / max(1, x_small.size)


def network_levels(addition_small: np.ndarray, base_small: np.ndarray, x_small: np.ndarray) -> list[float]:
    """What a network added (output minus its global stage's output, analysis scale), as the
    components of the ``network`` score, where the source is judgeable (``_judgeable``):

    * per pyramid band, the worst region's RMS of the addition (a painted blob, new texture);
    * the worst blob: the addition's local mean against its surround;
    * per band, the worst region's share of the global stage's structure that the addition
      took away, ``-<addition, base> / (E(base) + c)`` (an erased edge: ~1 where the network
      removed what the global stage drew, ~0 where it kept or enhanced it; ``c`` the band's
      mean energy, so flat regions count as kept).  An erasure's RMS may be no larger than
      a strong network's normal edge enhancement; its sign tells them apart.

    :data:`LEVELS` bands each (zeros for bands an image is too small to have): a fixed
    layout, compared with a calibration by :func:`network_score`.
    """
    n = torch.from_numpy(np.ascontiguousarray(addition_small, dtype=np.float32))[None, None]
    b = torch.from_numpy(np.ascontiguousarray(base_small, dtype=np.float32))[None, None]
    judge = _judgeable(x_small)

    def worst(t: torch.Tensor) -> float:
        return float((F.interpolate(t, size=n.shape[-2:], mode="bilinear", align_corners=False) * judge).max())

    bands, _ = _pyramid(n)
    base_bands, _ = _pyramid(b)
    rms, erased = [0.0] * LEVELS, [0.0] * LEVELS
    for level, (a, q) in enumerate(zip(bands, base_bands)):
        rms[level] = worst(_box(a * a, BAND_WINDOW).clamp_min(0).sqrt())
        energy = _box(q * q, BAND_WINDOW)
        c = float((q * q).mean().clamp_min(1e-12))
        erased[level] = worst((-_box(a * q, BAND_WINDOW)).clamp_min(0) / (energy + c))
    near, far = BLOB_WINDOWS
    return rms + [float(((_box(n, near) - _box(n, far)).abs() * judge).max())] + erased


def _network_floors() -> list[float]:
    """Per component of :func:`network_levels`, the value under which it counts as none."""
    return [NETWORK_FLOOR] * (LEVELS + 1) + [ERASED_FLOOR] * LEVELS


def network_score(levels: list[float], scale: list[float]) -> float:
    """The largest ratio of :func:`network_levels` to the model's calibrated ones (floored, so a
    network that normally adds or removes nothing is judged against little, not nothing).
    A scale from an older calibration (fewer components) judges only the components it has."""
    return max(v / max(s, floor) for v, s, floor in zip(levels, scale, _network_floors()))


def window_share(x: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Per cent of the valid pixels that the input window clipped (model space: at -1 or +1)."""
    values = x if valid is None else x[valid]
    return 100.0 * float(np.count_nonzero(np.abs(values) >= 1.0)) / max(1, values.size)


def fixed_window(model: "StyleModel") -> bool:
    """Whether ``model`` reads absolute values through one fixed window (``engine.radiograph``)."""
    return model.normalization.get("method") == "fixed"


def network_addition(y: np.ndarray, base: np.ndarray) -> np.ndarray:
    """What the network added: the output minus its global stage's output, both as shown
    (clipped to the model range, as ``to_output_pixels`` clips)."""
    return np.clip(y, -1.0, 1.0) - np.clip(base, -1.0, 1.0)


def cycle_score(inverse: "StyleModel", x: np.ndarray, y: np.ndarray, *, device: Any = None) -> float:
    """The share of the source's detail that ``F(y)`` does not restore, at :data:`CYCLE_SIDE`
    (a whole-image measure: local changes are the ``structure`` score's job).

    Its prediction has no output curve: the second fit explains a good round trip almost
    entirely but not an inverse that clips the darkest lung to black holes (the inverse's
    flaw, not the output's), so the calibration's tail grew past its margin (measured at a
    side of 256: 2 of 150 held-out images of the ``classic`` pair flagged; none without it).
    The inverse runs at :data:`CYCLE_SIDE` = 128: at most 1/64 of a 1024 px translation's
    pixels, and the gross faults it is there for (untrained, inverted) still score 0.3-1.8
    against thresholds of ~0.1-0.12 (bench/fidelity.py)."""
    from .tiling import translate

    ys = analysis_view(np.clip(y, -1.0, 1.0), side=CYCLE_SIDE)
    back = translate(inverse, ys, tile=0, device=device)
    return structure_scores(back, analysis_view(x, side=CYCLE_SIDE), output_curve=False)["unexplained"]


def _fidelity_meta(model: "StyleModel") -> dict[str, Any]:
    meta = model.metadata.get("fidelity")
    return meta if isinstance(meta, dict) else {}


def thresholds_of(model: "StyleModel") -> tuple[dict[str, float], bool]:
    """The model's thresholds (calibrated, or the defaults for what it lacks) and whether calibrated."""
    stored = _fidelity_meta(model).get("thresholds") or {}
    out = dict(DEFAULT_THRESHOLDS)
    for k in SCORES:
        if isinstance(stored.get(k), (int, float)):
            out[k] = float(stored[k])
    return out, bool(stored)


def _domain_of(model: "StyleModel") -> list[StyleStats] | None:
    items = _fidelity_meta(model).get("domain")
    if not isinstance(items, list) or not items:
        return None
    try:
        return [StyleStats(quantiles=list(d["quantiles"]), band_energy=list(d["band_energy"]),
                           spectrum=list(d["spectrum"]), images=int(d.get("images", 1))) for d in items]
    except (KeyError, TypeError, ValueError):
        return None


def _network_scale(model: "StyleModel") -> list[float] | None:
    scale = _fidelity_meta(model).get("network_scale")
    if isinstance(scale, list) and scale and all(isinstance(v, (int, float)) for v in scale):
        return [float(v) for v in scale]
    return None


def base_of(model: "StyleModel", x: np.ndarray, *, device: Any = None) -> np.ndarray:
    """What the model's global stage makes of ``x`` (``x`` itself when it has none), computed
    anew: callers that translate get it for free from ``tiling.translate_with_base``."""
    stage = getattr(model.generator, "tone_filter", None)
    if stage is None:
        return np.asarray(x, dtype=np.float32)
    p = next(stage.buffers(), None)  # curves and gains are buffers: a ToneFilter has no parameters
    with torch.inference_mode():
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
        return stage(t.to(p.device if p is not None else "cpu"))[0, 0].to("cpu", torch.float32).numpy()


def _input_domain(model: "StyleModel") -> tuple[list[float] | None, float | None]:
    """The domain's noise levels and saturation step level, when the model was calibrated with them."""
    meta = _fidelity_meta(model)
    items = meta.get("domain")
    levels = None
    if isinstance(items, list) and items and all(isinstance(d, dict) and isinstance(d.get("noise"), (int, float))
                                                   for d in items):
        levels = [float(d["noise"]) for d in items]
    sat = meta.get("saturated_surround")  # (an older "saturated_level" measured another step: skipped)
    return levels, (float(sat) if isinstance(sat, (int, float)) else None)


def judge(scores: Mapping[str, float | None], thresholds: Mapping[str, float]) -> tuple[str, list[str]]:
    """ok, or flagged with one reason per score above its threshold (absent scores are skipped)."""
    words = {"structure": "a region differs from the source", "band_structure": "an edge differs from the source",
             "unexplained": "output not explained by the source",
             "network": "the network changed a region more than it ever did in calibration",
             "cycle": "inverse model does not restore the source", "ood": "input unlike the training data",
             "noise": "input noise unlike the training data",
             "saturated": "saturated regions unlike the training data (metal?)",
             "window": "input values outside the model's intensity window"}
    reasons = [f"{words[k]} ({k} {float(scores[k]):.2f} > {thresholds[k]:.2f})"  # type: ignore[arg-type]
               for k in SCORES if scores.get(k) is not None and k in thresholds
               and not float(scores[k]) <= thresholds[k]]  # type: ignore[arg-type]
    return (FLAGGED if reasons else OK), reasons


def assess(model: "StyleModel", x: np.ndarray, y: np.ndarray, *, valid: np.ndarray | None = None,
           inverse: "StyleModel | None" = None, device: Any = None, base: np.ndarray | None = None) -> FidelityReport:
    """The guard's report for source ``x`` and output ``y`` (model space, full resolution).

    ``base``: the model's global stage's output for ``x`` (``tiling.translate_with_base``);
    computed here when a model calibrated for the ``network`` score comes without it.
    """
    thresholds, calibrated = thresholds_of(model)
    y = np.clip(y, -1.0, 1.0)  # what the output shows (to_output_pixels clips)
    xs, ys = analysis_view(x, valid), analysis_view(y, valid)
    if min(xs.shape) < 2 * WINDOW:
        return FidelityReport(verdict=FLAGGED, reasons=[f"image too small to check (< {2 * WINDOW} pixels)"],
                              scores={k: None for k in SCORES}, thresholds=thresholds, calibrated=calibrated)
    structure, (row, col) = _structure(xs, ys)
    scale = x.shape[0] / xs.shape[0]
    scores: dict[str, float | None] = dict(structure)
    domain = _domain_of(model)
    scores["ood"] = ood_score(xs, domain) if domain is not None else None
    scores["cycle"] = cycle_score(inverse, x, y, device=device) if inverse is not None else None
    noise_levels, sat_level = _input_domain(model)
    vs = None if valid is None or valid.all() else analysis_view(valid.astype(np.float32)) >= 1.0
    scores["noise"] = noise_score(noise_level(xs, vs), noise_levels) if noise_levels else None
    scores["saturated"] = saturated_score(xs, sat_level) if sat_level is not None else None
    scores["window"] = window_share(x, valid) if fixed_window(model) else None
    network = _network_scale(model)
    if network is not None:
        if base is None:
            base = base_of(model, x, device=device)
        levels = network_levels(analysis_view(network_addition(y, base), valid),
                                analysis_view(np.clip(base, -1.0, 1.0), valid), xs)
        scores["network"] = network_score(levels, network)
    else:
        scores["network"] = None
    if not all(np.isfinite(v) for v in scores.values() if v is not None):
        scores = {k: (v if v is None or np.isfinite(v) else 99.0) for k, v in scores.items()}
    verdict, reasons = judge(scores, thresholds)
    calibrated_for = _fidelity_meta(model).get("weights_sha256")
    if calibrated and calibrated_for and model.weights_sha256 and calibrated_for != model.weights_sha256:
        # The thresholds say what *these* weights normally do: others were never measured.
        verdict, reasons = FLAGGED, reasons + [STALE_CALIBRATION]
    return FidelityReport(verdict=verdict, reasons=reasons, scores={k: _round(v) for k, v in scores.items()},
                          thresholds=thresholds, calibrated=calibrated,
                          worst_region=(int((row + 0.5) * scale), int((col + 0.5) * scale)))


def calibrate_thresholds(samples: Mapping[str, list[float]]) -> dict[str, float]:
    """Thresholds from held-out scores: the highest seen plus a margin (see module doc)."""
    out = {}
    for k in SCORES:
        values = [float(v) for v in samples.get(k) or [] if v is not None and np.isfinite(v)]
        if values:
            top = max(values)
            out[k] = round(top + max(MARGIN_ABS[k], MARGIN_REL[k] * top), 4)
    return out


def _round(v: float | None) -> float | None:
    return None if v is None else round(float(v), 4)

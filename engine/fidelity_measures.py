"""How each fidelity score is measured: functions of a source, its output and a training domain.

Why a module of its own: these are the measurements, image in and number out; which of them
make the guard's scores, with what reason, margin and default threshold, is the table in
:mod:`.fidelity_scores`, and how they are judged is :mod:`.fidelity` (its docstring explains
each score).  All work on an area-downsampled copy (:func:`analysis_view`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from .style_stats import StyleStats, style_distance, style_statistics
from .tone_filter import uniform_curve

if TYPE_CHECKING:
    from .model_file import StyleModel

__all__ = ["analysis_view", "disagreement", "structure_scores", "structure_with_worst", "domain_statistics",
           "ood_score", "noise_level", "noise_score", "saturated_level", "saturated_score", "network_levels",
           "network_score", "network_addition", "window_share", "cycle_score", "base_of",
           "ANALYSIS_SIDE", "CYCLE_SIDE", "LEVELS", "WINDOW", "CLIPPED", "NETWORK_FLOOR", "ERASED_FLOOR"]

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
    out: np.ndarray = np.interp(q * (s.size - 1), np.arange(s.size), s)
    return out


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
    return structure_with_worst(x, y, output_curve=output_curve)[0]


def structure_with_worst(x: np.ndarray, y: np.ndarray, *, output_curve: bool = True
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


def ood_score(own: StyleStats, domain: list[StyleStats]) -> float:
    """Style distance of an input (its statistics at analysis scale: ``style_statistics([x_small])``)
    to the nearest image of its model's domain."""
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
    surround: np.ndarray = total[rim] / count[rim]
    return surround


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



def network_addition(y: np.ndarray, base: np.ndarray) -> np.ndarray:
    """What the network added: the output minus its global stage's output, both as shown
    (clipped to the model range, as ``to_output_pixels`` clips)."""
    added: np.ndarray = np.clip(y, -1.0, 1.0) - np.clip(base, -1.0, 1.0)
    return added


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



def base_of(model: "StyleModel", x: np.ndarray, *, device: Any = None) -> np.ndarray:
    """What the model's global stage makes of ``x`` (``x`` itself when it has none), computed
    anew: callers that translate get it for free from ``tiling.translate_with_base``."""
    stage = getattr(model.generator, "tone_filter", None)
    if stage is None:
        return np.asarray(x, dtype=np.float32)
    p = next(stage.buffers(), None)  # curves and gains are buffers: a ToneFilter has no parameters
    with torch.inference_mode():
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
        out: torch.Tensor = stage(t.to(p.device if p is not None else "cpu"))
        return out[0, 0].to("cpu", torch.float32).numpy()


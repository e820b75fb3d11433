"""Fit a :class:`~dicom_node.engine.tone_filter.ToneFilter` from two unpaired domains.

No pairs are needed because every step matches a *distribution* of the source domain to the
target domain's:

1. ``tone_in``: histogram matching (1-D optimal transport of the intensity distributions), the
   exact answer for the tone part of a style, through a few matched quantiles
   (:data:`TONE_QUANTILES`: the fine shape of a domain's histogram is mostly its content);
2. band gains: for each band of the multi-scale split, the square root of the ratio of the
   domains' mean band energy (the target's power spectrum over the source's, per octave), so
   edge enhancement, dynamic-range compression and noise reduction are matched scale by scale;
   or (``band_curves``, the default of ``dicom-node train``) a band curve: the distribution of
   the coefficients' magnitudes matched, so the gain may depend on the amplitude (multiscale
   contrast equalisation lifts small coefficients and compresses large ones; noise reduction
   lowers the smallest); with ``brightness_bins`` (4, the default of ``dicom-node train``) one
   such curve per band of local brightness, each fitted on the coefficients whose low-pass
   ranks near that bin's in their own domain (ranks, so the tone curves need not be right
   first), so the gain may also depend on where the detail sits on the grey scale;
3. ``tone_out``: histogram matching again, of the filtered source onto the target, so the
   output's intensity distribution is the target's whatever the gains did to it;
4. with ``local_bins`` > 1 (``dicom-node train``: with validation pairs, which check them, by
   default): one more such curve per bin of local brightness
   (the rank of the neighbourhood's mean in its own domain), each fitted on the pixels whose
   neighbourhood ranks near that bin's in each domain, so a value may map differently in dark
   and bright surroundings (adaptive equalisation, strong dynamic-range compression).

With validation pairs (``data.val``) they also choose how many quantiles the tone curves match,
the chosen stage's output level and how much of its fitted shape to keep (:mod:`.stage_choice`),
and whether the local tone curves, fitted on the chosen stage as fitted, do better
(:func:`_with_local_tone_if_better`).

Collimated borders are left out of every image first (:mod:`.collimation`): their share of an
image is the radiographer's choice, not the vendor's processing.

Measured on the demo style pairs (``bench/quality.py``) this alone beats global histogram
matching by several dB; the residual network trained after it learns the rest.
"""
from __future__ import annotations

import copy
import logging
from typing import Iterable, Sequence

import numpy as np
import torch

from dicom_node.engine.style_stats import band_energies, sample_pixels
from dicom_node.engine.tone_filter import (
    BRIGHTNESS_KNOTS,
    DEFAULT_BAND_KNOTS,
    DEFAULT_KNOTS,
    DEFAULT_SIGMAS,
    ToneFilter,
    band_split,
    gaussian_blur,
)

from .collimation import without_collimation
from .data import pick_indices
from .exam_mix import describe_mix, mix_repeats, repeated, share_no_body_part, weighs_anything
from .pair_scores import pooled_gain_db
from .stage_choice import (
    DEFAULT_TONE_QUANTILES,
    FULL_DETAIL,
    TONE_QUANTILES,
    as_batch,
    choose_shape,
    choose_tone_detail,
    detail_name,
    fit_level_saying,
    stage_output,
)

__all__ = ["fit_tone_filter", "GAIN_LIMITS", "BAND_CURVE_LIMITS", "band_levels"]

log = logging.getLogger("dicom_node.train")

# A style changes a band by at most this factor; beyond it the ratio measures noise or content
# differences between the domains rather than processing.
GAIN_LIMITS = (0.25, 4.0)
# A band curve's gain at one amplitude may go further: near zero the target may hold noise the
# source lacks (or the reverse), and bench/quality.py's linear style lost 0.9 dB with GAIN_LIMITS.
BAND_CURVE_LIMITS = (1.0 / 16.0, 16.0)
# Images per domain the fit reads.  Which images a domain holds moves every distribution the fit
# matches (their content, not only their look), and more images average that out: fitted on 4
# disjoint sets of 12 phantoms the denoise first stage scored 39.0 to 48.7 dB, on 24 43.8 / 46.9,
# on 48 48.2 (unsharp 34.8-47.4, 40.5 / 46.1, 44.4; bench/first_stage_content.py).
MAX_IMAGES = 48
PIXELS_PER_IMAGE = 200_000  # sampled for the quantiles, at most, from each image ...
PIXELS_PER_DOMAIN = 2_400_000  # ... and from all a domain's images together
MIN_BIN_PIXELS = 1000  # a local tone curve fitted on fewer pixels in either domain stays the identity
def _pixels_per_image(count: int) -> int:
    """Pixels sampled from each of ``count`` images: the same total whatever the count."""
    return min(PIXELS_PER_IMAGE, PIXELS_PER_DOMAIN // max(1, count))


def band_levels(knots: int) -> np.ndarray:
    """Quantile levels of a band curve's knots: even up to the median (the middle knot), then
    closing in on 1 geometrically to 1 - 5e-5, because the large, rare coefficients (edges)
    are where multiscale processing differs most."""
    half = knots // 2
    upper = 1.0 - np.logspace(np.log10(0.5), np.log10(5e-5), knots - half)
    return np.concatenate([np.linspace(0.0, 0.5, half, endpoint=False), upper])


def _band_curve(src: np.ndarray, dst: np.ndarray, knots: int) -> tuple[np.ndarray, np.ndarray]:
    """Knots ``(xs, ys)`` of the curve taking the magnitudes ``|src|`` to the distribution of
    ``|dst|``: 1-D optimal transport, as for the tone curves.  The gain ``ys / xs`` stays within
    :data:`BAND_CURVE_LIMITS` and the curve monotone, so that noise in the sparse tail (or content that
    differs between the domains) cannot turn into an extreme or order-reversing gain."""
    q = band_levels(knots)
    xs, ys = np.quantile(np.abs(src), q), np.quantile(np.abs(dst), q)
    xs = np.maximum.accumulate(xs) + np.arange(knots) * 1e-9 * max(float(xs[-1]), 1e-6)  # strictly increasing
    xs[0], ys[0] = 0.0, 0.0
    ys[1:] = np.clip(ys[1:], BAND_CURVE_LIMITS[0] * xs[1:], BAND_CURVE_LIMITS[1] * xs[1:])
    return xs.astype(np.float32), np.maximum.accumulate(ys).astype(np.float32)


def _matching_curve(src: np.ndarray, dst: np.ndarray, grid: np.ndarray, quantiles: int = FULL_DETAIL) -> np.ndarray:
    """Monotone curve on ``grid`` taking the distribution of ``src`` to that of ``dst``: through
    ``quantiles`` matched quantiles, every one from 0 to 1 at :data:`FULL_DETAIL`, else evenly
    from 1 % to 99 %, straight beyond them (a coarse curve: :data:`TONE_QUANTILES`)."""
    if quantiles >= FULL_DETAIL:
        q = np.linspace(0.0, 1.0, FULL_DETAIL)
    else:
        q = np.linspace(0.01, 0.99, max(2, quantiles))
    xs, ys = np.quantile(src, q), np.quantile(dst, q)
    # np.interp needs increasing knots: ties (clipped or padded pixels) get a vanishing slope.
    xs = xs + np.arange(xs.size) * 1e-9
    curve: np.ndarray = np.interp(grid, xs, ys)
    if quantiles < FULL_DETAIL:  # the end segments' slopes carried on
        first, last = (ys[1] - ys[0]) / (xs[1] - xs[0]), (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        curve = np.where(grid < xs[0], ys[0] + first * (grid - xs[0]), curve)
        curve = np.where(grid > xs[-1], ys[-1] + last * (grid - xs[-1]), curve)
    return curve.astype(np.float32)


@torch.no_grad()
def fit_tone_filter(src: Sequence[np.ndarray], dst: Sequence[np.ndarray], *,
                    sigmas: Sequence[float] = DEFAULT_SIGMAS, knots: int = DEFAULT_KNOTS,
                    band_curves: bool = False, brightness_bins: int = 1, local_bins: int = 1,
                    pairs: Sequence[tuple[np.ndarray, np.ndarray]] = (), tone_quantiles: int = DEFAULT_TONE_QUANTILES,
                    src_parts: Sequence[str] = (), dst_parts: Sequence[str] = (), seed: int = 0) -> ToneFilter:
    """A ToneFilter taking images like ``src`` (model space) to the look of ``dst``; with
    ``band_curves`` one curve per band (amplitude-dependent gains) instead of one gain, with
    ``brightness_bins`` > 1 one per band and brightness bin, with ``local_bins`` > 1 local tone
    curves after the output tone curve.  Given the true ``pairs`` (source, target), they choose
    how many quantiles the tone curves match (:func:`choose_tone_detail`; else ``tone_quantiles``)
    and whether the local tone curves stay (:func:`_with_local_tone_if_better`).  Given each image's body
    part (``src_parts``, ``dst_parts``, in the images' order), each body part weighs alike in
    both domains (:mod:`.exam_mix`)."""
    a, b = _images_to_fit(src, dst, src_parts, dst_parts)

    def stage(quantiles: int) -> tuple[ToneFilter, np.random.Generator]:
        """The stage fitted through ``quantiles`` (0: unfitted, the identity) and its random
        stream, which the local tone curves carry on."""
        rng = np.random.default_rng(seed)
        tf = ToneFilter(sigmas=sigmas, knots=knots, band_knots=DEFAULT_BAND_KNOTS if band_curves else 0,
                        brightness_bins=brightness_bins if band_curves else 1, local_bins=local_bins)
        return (_fit_stage(a, b, tf, quantiles, rng) if quantiles else tf), rng

    if pairs:
        stages = {q: stage(q) for q in TONE_QUANTILES}
        best = choose_tone_detail({q: fitted for q, (fitted, _) in stages.items()}, pairs)
        chosen, rng = stages[best]
        tf, said = fit_level_saying(chosen, pairs)
        log.info("%s", said)
        tf, _, said = choose_shape(tf, pairs)
        log.info("%s", said)
        if tf.local_bins > 1:
            tf = _with_local_tone_if_better(tf, chosen, a, b, rng, pairs, best or DEFAULT_TONE_QUANTILES)
    else:
        tf, rng = stage(tone_quantiles)
        log.info("tone curves through %s quantiles (no validation pairs, data.val, to choose how many)",
                 detail_name(tone_quantiles))
        if tf.local_bins > 1:
            _fit_local_tone(tf, [tf.before_local_tone(as_batch(im)) for im in a], b, rng,
                            (_pixels_per_image(len(a)), _pixels_per_image(len(b))))
            log.info("local tone curves not checked: no validation pairs (data.val) to show whether they help")
    described = tf.describe()
    log.info("tone filter fitted: band gains %s (sigmas %s px)%s",
             " ".join(f"{g:.2f}" for g in described.get("band_gains", described.get("band_gains_small", []))),
             " ".join(f"{s:g}" for s in tf.sigmas),
             f"; local tone curves in {tf.local_bins} bins of local brightness (sigma {tf.local_sigma:g} px)"
             if tf.local_tone_changes() else "")
    return tf


def _fit_stage(a: list[np.ndarray], b: list[np.ndarray], tf: ToneFilter, quantiles: int,
               rng: np.random.Generator) -> ToneFilter:
    """``tf`` (in place) fitted up to its output tone curve, the tone curves through ``quantiles``
    matched quantiles (module doc, steps 1 to 3)."""
    knots = tf.tone_in.numel()
    grid = np.linspace(-1.0, 1.0, knots)
    per_a, per_b = _pixels_per_image(len(a)), _pixels_per_image(len(b))
    tf.tone_in.copy_(torch.from_numpy(_matching_curve(sample_pixels(a, per_a, rng), sample_pixels(b, per_b, rng),
                                                      grid, quantiles)))

    def toned(images: list[np.ndarray]) -> list[torch.Tensor]:
        return [tf.before_local_tone(as_batch(im)) for im in images]

    if tf.band_curves and tf.brightness_bins > 1:
        _fit_binned_band_curves(tf, toned(a), b, rng, (per_a, per_b))
    elif tf.band_curves:
        _fit_band_curves(tf, toned(a), b, rng, (per_a, per_b))
    else:  # energies of the toned source (gains still 1) against the target
        e_src = np.mean([band_energies(t, tf.sigmas) for t in toned(a)], axis=0)
        e_dst = np.mean([band_energies(im, tf.sigmas) for im in b], axis=0)
        gains = np.sqrt(np.maximum(e_dst, 1e-12) / np.maximum(e_src, 1e-12))
        tf.gains.copy_(torch.from_numpy(np.clip(gains, *GAIN_LIMITS).astype(np.float32)))
    # The output curve: filtered source distribution onto the target's.  tone_out is still the
    # identity on [-1, 1], so first widen its range to what the filter produces.
    tf.out_range.copy_(torch.tensor([-4.0, 4.0]))
    tf.tone_out.copy_(torch.linspace(-4.0, 4.0, knots))
    filtered = np.concatenate([t.numpy().ravel() for t in toned(a)])
    lo, hi = float(filtered.min()), float(filtered.max())
    pad = 1e-3 * max(hi - lo, 1e-6)
    lo, hi = lo - pad, hi + pad
    out_grid = np.linspace(lo, hi, knots)
    f_sample = filtered[rng.choice(filtered.size, min(filtered.size, per_a * len(a)), replace=False)]
    tf.tone_out.copy_(torch.from_numpy(_matching_curve(f_sample.astype(np.float64), sample_pixels(b, per_b, rng),
                                                       out_grid, quantiles)))
    tf.out_range.copy_(torch.tensor([lo, hi], dtype=torch.float32))
    return tf


def _fit_band_curves(tf: ToneFilter, toned: list[torch.Tensor], dst: list[np.ndarray],
                     rng: np.random.Generator, per_image: tuple[int, int]) -> None:
    """Each band's curve: the toned source's coefficients onto the target's (in place);
    ``per_image``: pixels sampled from each source and each target image."""
    def coefficients(images: list[torch.Tensor], count: int) -> list[np.ndarray]:
        per_band: list[list[np.ndarray]] = [[] for _ in tf.sigmas]
        for im in images:
            for k, band in enumerate(band_split(im, tf.sigmas)[:-1]):
                per_band[k].append(sample_pixels([band.numpy()], count, rng))
        return [np.concatenate(cs) for cs in per_band]

    src_bands = coefficients(toned, per_image[0])
    dst_bands = coefficients([torch.from_numpy(im)[None, None] for im in dst], per_image[1])
    knots = tf.band_x.shape[1]
    for k, (s, d) in enumerate(zip(src_bands, dst_bands)):
        xs, ys = _band_curve(s, d, knots)
        tf.band_x[k].copy_(torch.from_numpy(xs))
        tf.band_y[k].copy_(torch.from_numpy(ys))


def _images_to_fit(src: Sequence[np.ndarray], dst: Sequence[np.ndarray], src_parts: Sequence[str],
                   dst_parts: Sequence[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The images the fit reads (up to :data:`MAX_IMAGES` of each domain, evenly spread, without
    their collimated borders), each repeated as :func:`.exam_mix.mix_repeats` says when the body
    parts are given, and logged when that changes anything."""
    picked = [pick_indices(len(images), MAX_IMAGES) for images in (src, dst)]
    a, b = (_without_borders([np.asarray(images[i], np.float32) for i in idx], name)
            for images, idx, name in ((src, picked[0], "source"), (dst, picked[1], "target")))
    if not src_parts or not dst_parts:
        return a, b
    parts_a, parts_b = [src_parts[i] for i in picked[0]], [dst_parts[i] for i in picked[1]]
    mixes = f"source: {describe_mix(parts_a)}; target: {describe_mix(parts_b)}"
    if share_no_body_part(parts_a, parts_b):
        log.warning("tone filter fit: the domains share no body part (%s), so the fit reads the difference in "
                    "anatomy as style (docs/training.md)", mixes)
        return a, b
    rep_a, rep_b = mix_repeats(parts_a, parts_b)
    if not weighs_anything((rep_a, rep_b)):
        return a, b
    said = "; ".join(f"{name} {part or 'unknown'} x{times}" if times else f"{name} {part or 'unknown'} left out"
                     for name, parts, reps in (("source", parts_a, rep_a), ("target", parts_b, rep_b))
                     for part, times in sorted(set(zip(parts, reps))) if times != 1)
    log.info("tone filter fit: the domains hold other mixes of body parts (%s), so each part weighs alike in both "
             "(%s)", mixes, said)
    return repeated(a, rep_a), repeated(b, rep_b)


def _without_borders(images: list[np.ndarray], name: str) -> list[np.ndarray]:
    """``images`` without their collimated borders (:mod:`.collimation`), logged when any had one."""
    out = [np.ascontiguousarray(without_collimation(im)) for im in images]
    cut = sum(o.shape != im.shape for o, im in zip(out, images))
    if cut:
        log.info("tone filter fit: collimated borders left out of %d of the %d %s images", cut, len(images), name)
    return out


def _pooled_samples(maps: Iterable[torch.Tensor], rng: np.random.Generator, per_image: int) -> np.ndarray:
    """``(rows, pixels)``: each image's ``(rows, its pixels)`` map at up to ``per_image`` of its
    pixels, drawn at random (the same pixels for every row), pooled over the images."""
    parts = []
    for flat in maps:
        k = min(per_image, flat.shape[1])
        parts.append(flat[:, rng.choice(flat.shape[1], k, replace=False)] if k < flat.shape[1] else flat)
    return np.concatenate([p.numpy() for p in parts], axis=1).astype(np.float64)


def _band_samples(images: list[torch.Tensor], sigmas: Sequence[float], rng: np.random.Generator,
                  per_image: int) -> np.ndarray:
    """``(bands + 1, pixels)``: each band's coefficient and the low-pass at the same random pixels
    (up to ``per_image`` of each image), pooled."""
    return _pooled_samples((torch.stack([band.reshape(-1) for band in band_split(im, sigmas)]) for im in images),
                           rng, per_image)


def _ranks(low: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """Brightness ranks in [0, 1] as the engine computes them: through the domain's quantiles."""
    ranks: np.ndarray = np.interp(low, quantiles + np.arange(quantiles.size) * 1e-9, np.linspace(0.0, 1.0, quantiles.size))
    return ranks


def _ranked(src_low: np.ndarray, tgt_low: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The source's quantiles at :data:`BRIGHTNESS_KNOTS` even levels (what the engine ranks a
    pixel through, stored in the filter) and each sample's rank in its own domain."""
    levels = np.linspace(0.0, 1.0, BRIGHTNESS_KNOTS)
    q_src, q_tgt = np.quantile(src_low, levels), np.quantile(tgt_low, levels)
    return q_src, _ranks(src_low, q_src), _ranks(tgt_low, q_tgt)


def _in_bin(ranks: np.ndarray, m: int, bins: int) -> np.ndarray:
    """The samples that bin ``m`` of ``bins`` is fitted on: ranks within one bin width of its
    centre ``(m + 1/2) / bins`` (neighbouring bins overlap, so the blend between centres is smooth)."""
    in_bin: np.ndarray = (ranks >= (m - 0.5) / bins) & (ranks <= (m + 1.5) / bins)
    return in_bin


def _fit_binned_band_curves(tf: ToneFilter, toned: list[torch.Tensor], dst: list[np.ndarray],
                            rng: np.random.Generator, per_image: tuple[int, int]) -> None:
    """Each band's curve per brightness bin (in place).  Bin ``m`` of M is centred on brightness
    rank ``(m + 1/2) / M`` and fitted on the coefficients within one bin width of it in each
    domain (neighbouring bins overlap, so the blend between their centres is smooth).  Ranks
    pair the domains' grey scales as histogram matching does, whatever the content shown."""
    bins, knots = tf.brightness_bins, tf.band_x.shape[-1]
    src = _band_samples(toned, tf.sigmas, rng, per_image[0])
    tgt = _band_samples([torch.from_numpy(im)[None, None] for im in dst], tf.sigmas, rng, per_image[1])
    q_src, r_src, r_tgt = _ranked(src[-1], tgt[-1])
    tf.brightness.copy_(torch.from_numpy(q_src.astype(np.float32)))
    for m in range(bins):
        in_src, in_tgt = _in_bin(r_src, m, bins), _in_bin(r_tgt, m, bins)
        for k in range(len(tf.sigmas)):
            xs, ys = _band_curve(src[k][in_src], tgt[k][in_tgt], knots)
            tf.band_x[k, m].copy_(torch.from_numpy(xs))
            tf.band_y[k, m].copy_(torch.from_numpy(ys))


def _fit_local_tone(tf: ToneFilter, filtered: list[torch.Tensor], dst: list[np.ndarray],
                    rng: np.random.Generator, per_image: tuple[int, int], quantiles: int = FULL_DETAIL) -> None:
    """The local tone curves (in place): curve ``l`` of L matches the values of the filtered
    source onto the target's, each taken where the neighbourhood's mean ``G_sigma`` ranks within
    one bin width of rank ``(l + 1/2) / L`` in its own domain (as the brightness bins of
    :func:`_fit_binned_band_curves`: overlapping, so the blend is smooth; ranks, so the
    domains' grey scales need not agree first); through ``quantiles`` matched quantiles
    (:func:`_matching_curve`; every one without pairs, where 9 were no better: -0.5 to +0.2 dB
    on the demo's phantoms, -0.9 to +2.9 on its real crops, data seeds 0 and 1)."""
    def values_and_surroundings(images: list[torch.Tensor], count: int) -> np.ndarray:
        return _pooled_samples((torch.stack([im.reshape(-1), gaussian_blur(im, tf.local_sigma).reshape(-1)])
                                for im in images), rng, count)

    src = values_and_surroundings(filtered, per_image[0])
    tgt = values_and_surroundings([torch.from_numpy(im)[None, None] for im in dst], per_image[1])
    q_src, r_src, r_tgt = _ranked(src[1], tgt[1])
    tf.local_levels.copy_(torch.from_numpy(q_src.astype(np.float32)))
    grid = _identity_local_tone(tf)
    bins = tf.local_bins
    for m in range(bins):
        in_src, in_tgt = _in_bin(r_src, m, bins), _in_bin(r_tgt, m, bins)
        if min(in_src.sum(), in_tgt.sum()) < MIN_BIN_PIXELS:  # no neighbourhood like it (flat images): no change
            continue
        tf.local_curves[m].copy_(torch.from_numpy(_matching_curve(src[0][in_src], tgt[0][in_tgt], grid, quantiles)))


def _with_local_tone_if_better(shaped: ToneFilter, chosen: ToneFilter, a: list[np.ndarray], b: list[np.ndarray],
                               rng: np.random.Generator, pairs: Sequence[tuple[np.ndarray, np.ndarray]],
                               quantiles: int) -> ToneFilter:
    """The stage the true ``pairs`` chose (``shaped``: quantiles, level, shape) or, if it brings
    the pairs' outputs closer to their targets by :func:`~.pair_scores.pooled_gain_db` (pooled,
    as written and as a look, whichever gains less: the rule the checkpoint selection applies to
    the network), ``chosen`` (the same quantiles, as fitted) with local tone curves through the
    same ``quantiles`` and the level the pairs give them.  Why the same quantiles: curves through
    every one match the whole of each neighbourhood's histogram, content included, which the
    pairs' choice of fewer had left out (``multiscale``, data seed 1: left out at every
    quantile, kept and +3.8 dB through the chosen ones; bench/local_tone.py --with-pairs).  Why
    not on ``shaped``: the local curves match B's distributions per neighbourhood and would put
    back the level and the bends the pairs took out (on the demo's real crops 13 to 15 dB as
    written; on ``multiscale``, data seed 1, 3 dB).  Why the check:
    a distribution per neighbourhood holds more of the domains' content than a whole image's; on
    crops of different anatomy they cost up to 1.3 dB (bench/local_tone.py)."""
    local = copy.deepcopy(chosen)
    _fit_local_tone(local, [local.before_local_tone(as_batch(im)) for im in a], b, rng,
                    (_pixels_per_image(len(a)), _pixels_per_image(len(b))), quantiles)
    local, said = fit_level_saying(local, pairs, local_tone=True)
    log.info("%s", said)
    gain = pooled_gain_db([(stage_output(local, x, local_tone=True), y) for x, y in pairs],
                          [(stage_output(shaped, x), y) for x, y in pairs])
    said = f"{gain:+.2f} dB (as written or as a look, whichever gains less) on the {len(pairs)} validation pairs"
    if gain > 0:
        log.info("local tone curves kept: %s", said)
        return local
    log.warning("local tone curves left out (the identity): %s; the two domains may show different anatomy "
                "(docs/training.md)", said)
    _identity_local_tone(shaped)
    return shaped


@torch.no_grad()
def _identity_local_tone(tf: ToneFilter) -> np.ndarray:
    """``tf``'s local tone curves (in place) as the identity over every value its output tone
    curve can give, so the stage's output is the one before them; their grid of values."""
    lo, hi = float(tf.tone_out.min()), float(tf.tone_out.max())  # all the values the curves can see
    hi = max(hi, lo + 1e-6)
    tf.local_range.copy_(torch.tensor([lo, hi], dtype=torch.float32))
    grid = np.linspace(lo, hi, tf.local_curves.shape[1])
    tf.local_curves.copy_(torch.from_numpy(grid.astype(np.float32)).repeat(tf.local_bins, 1))
    return grid

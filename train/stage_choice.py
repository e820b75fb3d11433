"""What the validation pairs (``data.val``) choose about the first stage fitted without them.

A tone filter fitted by matching two domains' distributions (:mod:`.tone_fit`) cannot tell a
vendor's look from the content that differs between the domains (other anatomy, field of view,
collimation).  A few true pairs can, and they choose, in this order:

1. how many quantiles the tone curves match (:func:`choose_tone_detail`; 0 is no first stage);
2. the output level (:func:`fit_level`): one gain and offset on the output tone curve;
3. how much of the fitted *shape* to keep (:func:`choose_shape`): each tone curve moved toward
   its own straight line and each band curve toward a gain of 1, which keeps the stage's overall
   level and contrast and shrinks what the distributions read into the curves' bends.

Every choice is scored the same way (:func:`pair_score`): the pairs' squared errors pooled, as
written and as a look, so that the worst pair weighs most.
"""
from __future__ import annotations

import copy
import logging
from typing import Mapping, Sequence

import numpy as np
import torch

from dicom_node.engine.quality import DATA_RANGE
from dicom_node.engine.tone_filter import ToneFilter

from .pair_scores import pooled_affine, pooled_error

__all__ = ["TONE_QUANTILES", "DEFAULT_TONE_QUANTILES", "FULL_DETAIL", "LEVEL_GAIN_LIMITS", "SHAPE_KEPT",
           "choose_tone_detail", "fit_level", "fit_level_saying", "choose_shape", "with_shape", "pair_score", "stage_output",
           "detail_name", "as_batch"]

log = logging.getLogger("dicom_node.train")

# Quantiles a tone curve matches: every one (FULL_DETAIL), or only a few, so that it keeps the
# look's overall contrast and leaves the shape of each domain's histogram, much of which is its
# content, alone.  bench/tone_detail.py, first stage alone, 11 demo pairs x 3 data seeds:
# - on crops of real radiographs (other anatomy in each domain) full curves ended 3.5 to 7.9 dB
#   below the input; 9 quantiles gained +2.1 to +4.7 dB over them, 3 quantiles +4.8 to +10.6;
# - on the phantoms (alike in both domains) 9 quantiles were within -0.6 to +0.3 dB of full
#   curves; 3 lost 5.5 dB on the strong tone curve of the linear `classic` look.
# So 9 without pairs (DEFAULT_TONE_QUANTILES); with validation pairs they choose among all of
# these (:func:`choose_tone_detail`), 0 being no first stage at all (the identity), for when
# every fit lands below the input.
FULL_DETAIL = 1025
DEFAULT_TONE_QUANTILES = 9
TONE_QUANTILES = (FULL_DETAIL, 9, 3, 2, 0)
# The gain a level fitted on validation pairs (:func:`fit_level`) may add to a stage: beyond it
# the pairs say more than "the level is off", and the stage stays as the distributions fitted it.
LEVEL_GAIN_LIMITS = (0.5, 2.0)
# The shares of the fitted shape the pairs choose among (:func:`choose_shape`; 1: as fitted).
# bench/tone_detail.py, 3 pairs choose and 3 others score, data seeds 0-2: on the demo's crops of
# real radiographs +0.0 to +8.4 dB as written per pair-seed (none worse), -0.6 to +2.8 in look;
# on the phantoms, whose domains show alike content, the whole shape stayed in 34 folds of 36.
SHAPE_KEPT = (1.0, 0.75, 0.5, 0.25)


def choose_tone_detail(stages: Mapping[int, ToneFilter], pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> int:
    """Which of ``stages`` (by the quantiles their tone curves match, :data:`TONE_QUANTILES`; each
    up to its output tone curve) comes closest to the true ``pairs``' targets: the PSNR of the
    mean squared error over every pair, each output's error taken as written (what the node
    sends) and after its best gain and offset (its look, whatever the display window).  One
    pooled error, not a mean of PSNRs, so that a near-perfect score hides neither a bad one of
    the same image nor a pair that the stage spoils: the worst pairs weigh most, and a stage
    that helps most images but ruins one loses to the identity.  Why choose at all: a tone curve
    fitted without pairs cannot tell a look from the content that differs between the domains
    (:data:`TONE_QUANTILES`)."""
    scores = {q: pair_score(tf, pairs) for q, tf in stages.items()}
    best = max(scores, key=scores.__getitem__)
    said = ", ".join(f"{detail_name(q)}: {v:.2f} dB" for q, v in scores.items())
    if best:
        log.info("tone curves through %s quantiles, chosen on the %d validation pairs (%s)",
                 detail_name(best), len(pairs), said)
    else:
        log.warning("first stage left out (the identity, with the level the pairs give it, if any): every fit scored "
                    "below the input on the %d validation pairs (%s); the two domains may show different anatomy "
                    "(docs/training.md)", len(pairs), said)
    return best


def fit_level(tf: ToneFilter, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> ToneFilter:
    """A copy of ``tf`` whose output tone curve also applies the one gain and offset that bring
    its outputs on the true ``pairs`` closest to their targets as written
    (:func:`~.pair_scores.pooled_affine`); ``tf`` itself when the gain is beyond
    :data:`LEVEL_GAIN_LIMITS`, or unless a level fitted on all pairs but one brings the pair left
    out closer as written, for each pair left out in turn (fewer than 2 pairs cannot show it).
    Why: the tone curves match the two domains' distributions, so content that differs between
    them (other anatomy, field of view) moves where the output level lands.  On the demo's
    crops of real radiographs it landed about 0.09 (of the model's range of 2) too high,
    some 8 dB as written on held-out pairs; a look score (after each image's best gain and
    offset) cannot see that, the node writes it and the display window shows it.  Why the
    check: a level that differs from image to image is content.  On the demo's real crops
    (bench/tone_detail.py) one that passed with the left-out pairs' errors pooled made 3 other
    pairs up to 14 dB worse as written on one image; pair by pair, none of 12 folds it passed did."""
    return fit_level_saying(tf, pairs)[0]


def fit_level_saying(tf: ToneFilter, pairs: Sequence[tuple[np.ndarray, np.ndarray]], *,
                     local_tone: bool = False) -> tuple[ToneFilter, str]:
    """:func:`fit_level`'s result, and the log line that says what it did, or why not (the trainer
    logs it with the first stage it chose).  With ``local_tone`` the level is fitted on the whole
    stage's outputs and folded into the local tone curves, its last curves, instead: they are
    fitted after the level, by matching B's distributions, and would otherwise put back the level
    that the pairs took out (on the demo's real crops they cost 13 to 15 dB as written)."""
    n = len(pairs)
    what = "local tone curves' level" if local_tone else "output level"
    if n < 2:
        return tf, f"{what} left as fitted: one validation pair cannot show that its level holds for another"
    left = f"{what} left as fitted on the {n} validation pairs: "
    outs = [(stage_output(tf, x, local_tone), y) for x, y in pairs]
    gain, offset = pooled_affine(outs)
    if not LEVEL_GAIN_LIMITS[0] <= gain <= LEVEL_GAIN_LIMITS[1]:
        return tf, left + f"its gain, {gain:.2f}, is beyond {LEVEL_GAIN_LIMITS[0]} to {LEVEL_GAIN_LIMITS[1]}"
    for i, (out, target) in enumerate(outs):
        g, o = pooled_affine(outs[:i] + outs[i + 1:])
        if pooled_error([(np.clip(g * out + o, -1.0, 1.0), target)], look=False) >= pooled_error([outs[i]], look=False):
            return tf, left + f"fitted on the others, it does not bring pair {i + 1} closer as written"
    leveled = copy.deepcopy(tf)
    (leveled.local_curves if local_tone else leveled.tone_out).mul_(gain).add_(offset)
    before = pooled_error(outs, look=False)
    after = pooled_error([(stage_output(leveled, x, local_tone), y) for x, y in pairs], look=False)
    if after >= before:
        return tf, left + "it does not bring them closer as written"
    return leveled, (f"{what} fitted on the {n} validation pairs: {_error_db(after):.2f} dB as written, "
                     f"{_error_db(before):.2f} before")


def choose_shape(tf: ToneFilter, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[ToneFilter, float, str]:
    """``tf`` with the share of its fitted shape (:data:`SHAPE_KEPT`, :func:`with_shape`) that
    scores best on the true ``pairs`` (:func:`pair_score`), each share with the output level the
    pairs give it (:func:`fit_level`); the share; and the log line that says which, or why the
    whole shape stays.  Why: the distributions that the curves match hold each domain's content
    as well as its look, and on domains that show other anatomy the fitted bends are partly
    content; a straight line through the same curve keeps the look's level and contrast.

    A share other than the whole is kept only if, for each pair left out in turn, the share that
    scores best on the others does not make the pair left out worse than the whole shape (fewer
    than 2 pairs cannot show it), as for the level: a share that 3 pairs chose without this check
    cost up to 8.8 dB as written on 3 other pairs (``unsharp@real``, bench/README.md)."""
    n = len(pairs)
    if n < 2:
        return tf, 1.0, "first stage's shape kept whole: one validation pair cannot show that a share of it holds for another"
    candidates = {1.0: tf, **{kept: fit_level(with_shape(tf, kept), pairs) for kept in SHAPE_KEPT if kept < 1.0}}
    outs = {kept: [(stage_output(stage, x), y) for x, y in pairs] for kept, stage in candidates.items()}
    scores = {kept: _outputs_score(o) for kept, o in outs.items()}
    best = max(scores, key=scores.__getitem__)
    said = ", ".join(f"{kept:.0%}: {v:.2f} dB" for kept, v in scores.items())
    if best == 1.0:
        return tf, best, f"first stage's shape kept whole, chosen on the {n} validation pairs ({said})"
    for i in range(n):
        chosen = max(outs, key=lambda kept: _outputs_score(outs[kept][:i] + outs[kept][i + 1:]))
        if _outputs_score(outs[chosen][i:i + 1]) < _outputs_score(outs[1.0][i:i + 1]):
            return tf, 1.0, (f"first stage's shape kept whole on the {n} validation pairs ({said}): the share chosen on "
                             f"the others, {chosen:.0%}, makes pair {i + 1} worse")
    return candidates[best], best, (f"first stage's shape kept at {best:.0%} (each tone curve toward its straight "
                                    f"line, each band curve toward a gain of 1), chosen on the {n} validation pairs "
                                    f"({said}); the two domains may show different anatomy (docs/training.md)")


@torch.no_grad()
def with_shape(tf: ToneFilter, kept: float) -> ToneFilter:
    """A copy of ``tf`` with ``kept`` (0 to 1) of its shape: each tone curve moved toward its own
    least-squares straight line, each band curve toward a gain of 1 (the band's coefficients
    unchanged), by ``1 - kept``.  The straight lines keep the stage's overall level and contrast."""
    def toward_line(curve: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        xs = torch.linspace(lo, hi, curve.numel(), dtype=torch.float64)
        design = torch.stack([xs, torch.ones_like(xs)], 1)
        line = design @ torch.linalg.lstsq(design, curve.double()[:, None]).solution
        shrunk: torch.Tensor = (kept * curve.double() + (1.0 - kept) * line[:, 0]).to(curve.dtype)
        return shrunk

    shaped = copy.deepcopy(tf)
    shaped.tone_in.copy_(toward_line(tf.tone_in, -1.0, 1.0))
    lo, hi = (float(v) for v in tf.out_range)
    shaped.tone_out.copy_(toward_line(tf.tone_out, lo, hi))
    shaped.gains.copy_(kept * tf.gains + (1.0 - kept))
    if tf.band_curves:
        shaped.band_y.copy_(kept * tf.band_y + (1.0 - kept) * tf.band_x)
    return shaped


def pair_score(tf: ToneFilter, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """The stage's score on the true ``pairs``, in dB: the PSNR of the squared errors pooled over
    the pairs (:func:`~.pair_scores.pooled_error`), as written and as a look, averaged."""
    return _outputs_score([(stage_output(tf, x), y) for x, y in pairs])


def _outputs_score(outs: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """:func:`pair_score` of the stage's (output, target) pairs."""
    return _error_db(float(np.mean([pooled_error(outs, look=look) for look in (False, True)])))


def as_batch(image: np.ndarray) -> torch.Tensor:
    """One image as the ``(1, 1, H, W)`` float32 batch a :class:`ToneFilter` takes."""
    return torch.from_numpy(np.asarray(image, np.float32))[None, None]


def stage_output(tf: ToneFilter, x: np.ndarray, local_tone: bool = False) -> np.ndarray:
    """``tf`` up to its output tone curve (``local_tone``: the whole stage) on one image, clamped
    as the generator clamps."""
    stage = tf if local_tone else tf.before_local_tone
    out: np.ndarray = stage(as_batch(x))[0, 0].clamp(-1.0, 1.0).numpy()
    return out


def _error_db(error: float) -> float:
    """A pooled squared error (:func:`~.pair_scores.pooled_error`) as PSNR."""
    return float(10 * np.log10(DATA_RANGE ** 2 / error))


def detail_name(quantiles: int) -> str:
    """An entry of :data:`TONE_QUANTILES` as the log and the bench say it."""
    return "all" if quantiles >= FULL_DETAIL else "none" if quantiles == 0 else str(quantiles)

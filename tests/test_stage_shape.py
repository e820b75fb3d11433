"""How much of the first stage's fitted shape the validation pairs keep (train/stage_choice.py)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from dicom_node.engine.tone_filter import ToneFilter
from dicom_node.train import stage_choice
from dicom_node.train.stage_choice import choose_shape, pair_score, with_shape
from tests.test_tone_detail import anatomy, content_domains, fit


def s_curve() -> ToneFilter:
    """A stage whose input tone curve bends (an S-curve), everything else the identity."""
    tf = ToneFilter()
    tf.tone_in.copy_(torch.tanh(2 * tf.tone_in) / np.tanh(2))
    return tf


def run(tf: ToneFilter, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return tf(torch.from_numpy(x)[None, None])[0, 0].numpy()


def test_the_shape_shrinks_toward_the_curves_straight_lines_and_keeps_a_straight_curve() -> None:
    tf = s_curve()
    assert torch.equal(with_shape(tf, 1.0).tone_in, tf.tone_in)
    flat = with_shape(tf, 0.0).tone_in.double()
    assert torch.allclose(flat[2:] - 2 * flat[1:-1] + flat[:-2], torch.zeros(flat.numel() - 2, dtype=torch.float64),
                          atol=1e-6)  # a straight line
    assert float(flat[-1] - flat[0]) > 1.5  # with the curve's contrast, not flattened to a constant
    halfway = with_shape(tf, 0.5).tone_in
    assert torch.allclose(halfway, 0.5 * tf.tone_in + 0.5 * flat.float(), atol=1e-6)
    assert tf.tone_in is not halfway and torch.equal(tf.tone_in, s_curve().tone_in)  # a copy: tf is unchanged

    line = ToneFilter()
    line.tone_in.mul_(0.6).add_(0.1)  # a gain and an offset: the level and contrast a look keeps
    line.gains.copy_(torch.tensor([1.5] * line.gains.numel()))
    kept = with_shape(line, 0.25)
    assert torch.allclose(kept.tone_in, line.tone_in, atol=1e-6)
    assert torch.allclose(kept.gains, 0.25 * line.gains + 0.75)  # band gains toward 1


def test_band_curves_shrink_toward_a_gain_of_one() -> None:
    a = [anatomy(s, 0.0) for s in range(3)]
    b = [np.tanh(1.5 * x).astype(np.float32) for x in (anatomy(s, 0.0) for s in range(10, 13))]
    tf = fit(a, b, band_curves=True)
    assert not torch.equal(tf.band_x, tf.band_y)
    assert torch.equal(with_shape(tf, 0.0).band_y, tf.band_x)
    assert torch.allclose(with_shape(tf, 0.5).band_y, 0.5 * (tf.band_x + tf.band_y))


def test_pairs_keep_the_share_of_the_shape_that_their_look_has() -> None:
    """Targets halfway between the S-curve and its straight line: the pairs keep 50 %; targets on
    the S-curve itself: the whole stage, unchanged (the same object)."""
    tf = s_curve()
    xs = [anatomy(s, 0.0) for s in range(3)]
    halfway = with_shape(tf, 0.5)
    stage, kept, said = choose_shape(tf, [(x, run(halfway, x)) for x in xs])
    assert kept == 0.5 and "kept at 50%" in said and "chosen on the 3 validation pairs" in said, said
    assert pair_score(stage, [(x, run(halfway, x)) for x in xs]) > 80  # exact
    stage, kept, said = choose_shape(tf, [(x, run(tf, x)) for x in xs])
    assert stage is tf and kept == 1.0 and said.startswith("first stage's shape kept whole"), said


def test_a_share_that_one_pair_contradicts_is_not_kept() -> None:
    """Two pairs look like a quarter of the S-curve, the third like all of it: the quarter wins
    the pooled score, but chosen on the first two it makes the third worse than the whole shape,
    so the whole shape stays (as the level does when a pair left out disagrees); one pair alone
    cannot show that its share holds for another."""
    tf = s_curve()
    xs = [anatomy(s, 0.0) for s in range(3)]
    quarter = with_shape(tf, 0.25)
    pairs = [(xs[0], run(quarter, xs[0])), (xs[1], run(quarter, xs[1])), (xs[2], run(tf, xs[2]))]
    assert max((0.25, 0.5, 0.75, 1.0), key=lambda k: pair_score(with_shape(tf, k), pairs)) < 1.0  # the pooled score alone
    stage, kept, said = choose_shape(tf, pairs)
    assert stage is tf and kept == 1.0 and "makes pair 3 worse" in said, said
    stage, kept, said = choose_shape(tf, pairs[:1])
    assert stage is tf and kept == 1.0 and "one validation pair cannot show" in said, said


def test_the_trainer_says_how_much_of_the_shape_the_pairs_kept(caplog: pytest.LogCaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A's images show a dark region, B's a bright one, in a look that is only a gain and an
    offset: the bends that matching the distributions reads into the curves are content, and the
    held-out pairs come closer with the shape the pairs chose than with the whole shape."""
    look = lambda x: (0.8 * x + 0.1).astype(np.float32)  # noqa: E731
    a, b, pairs, held_out = content_domains(look)
    with caplog.at_level(logging.INFO, logger="dicom_node.train"):
        tf = fit(a, b, pairs=pairs)
    said = [r.getMessage() for r in caplog.records if "first stage's shape" in r.getMessage()]
    assert len(said) == 1 and "first stage's shape kept at" in said[0] and "validation pairs" in said[0], said
    monkeypatch.setattr(stage_choice, "SHAPE_KEPT", (1.0,))  # the trainer before the shape was chosen
    whole = fit(a, b, pairs=pairs)
    assert pair_score(tf, held_out) > pair_score(whole, held_out) + 1

"""How many quantiles the tone curves match, chosen on validation pairs (train/tone_fit.py)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from dicom_node.engine.quality import DATA_RANGE, psnr
from dicom_node.engine.tone_filter import ToneFilter, gaussian_blur
from dicom_node.train.stage_choice import DEFAULT_TONE_QUANTILES, FULL_DETAIL, choose_tone_detail, fit_level
from dicom_node.train.tone_fit import _matching_curve, fit_tone_filter
from tests.style_data import affine_psnr

SIZE = 128


def anatomy(seed: int, region: float) -> np.ndarray:
    """Detail over a smooth background, with a large flat region at level ``region`` (lung
    fields dark, bone or a collimated border bright) over about a third of the image: content,
    whose share of a histogram has nothing to do with a vendor's look."""
    rng = np.random.default_rng(seed)
    noise = torch.from_numpy(rng.standard_normal((2, SIZE, SIZE)).astype(np.float32))[:, None]
    back = gaussian_blur(noise[:1], 16.0)[0, 0].numpy() * 16 * 0.9
    detail = gaussian_blur(noise[1:], 1.5)[0, 0].numpy() * 1.5 * 0.1
    yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE
    cy, cx = rng.uniform(0.35, 0.65, 2)
    blob = 1 / (1 + np.exp(-((0.33 - np.hypot(yy - cy, xx - cx)) * 40)))
    return np.clip(back * (1 - blob) + region * blob + detail, -1, 1).astype(np.float32)


def fit(a: list[np.ndarray], b: list[np.ndarray], **kw: object) -> ToneFilter:
    return fit_tone_filter(a, b, seed=0, **kw)  # type: ignore[arg-type]  # one gain per band: fast, and the curves are the point


def scores(tf: ToneFilter, pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    with torch.no_grad():
        return float(np.mean([affine_psnr(tf(torch.from_numpy(x)[None, None])[0, 0].numpy(), y) for x, y in pairs]))


def picked(log: str) -> str:
    """How many quantiles the trainer said it chose ("all" or a number)."""
    return log.split("tone curves through ")[1].split(" ")[0]


def test_a_coarse_curve_is_exact_for_a_gain_and_offset_and_the_full_one_is_unchanged() -> None:
    rng = np.random.default_rng(0)
    src = rng.standard_normal(50_000) * 0.3
    grid = np.linspace(-1, 1, 257)
    for q in (2, 3, 9):
        assert np.allclose(_matching_curve(src, 0.5 * src + 0.1, grid, q), 0.5 * grid + 0.1, atol=2e-3), q
    full = _matching_curve(src, np.tanh(2 * src), grid)
    assert np.array_equal(full, _matching_curve(src, np.tanh(2 * src), grid, FULL_DETAIL))
    assert np.abs(full[128 + 40] - np.tanh(2 * grid[128 + 40])) < 0.02  # every quantile: the curve itself


def content_domains(look) -> tuple[list[np.ndarray], list[np.ndarray], list, list]:  # type: ignore[no-untyped-def]
    """A's images show a large dark region, B's a bright one; pairs and held-out pairs show both."""
    a = [anatomy(s, -0.5) for s in range(4)]
    b = [look(anatomy(s, 0.5)) for s in range(10, 14)]
    pairs, held_out = ([(x, look(x)) for x in (anatomy(s + first, region) for s, region in enumerate((-0.5, 0.5, 0.0)))]
                       for first in (20, 30))
    return a, b, pairs, held_out


def test_pairs_choose_coarse_curves_when_the_domains_differ_in_content_more_than_look(
        caplog: pytest.LogCaptureFixture) -> None:
    a, b, pairs, held_out = content_domains(lambda x: (0.8 * np.tanh(1.2 * x) + 0.1).astype(np.float32))  # softer, brighter
    with caplog.at_level(logging.INFO, logger="dicom_node.train"):
        tf = fit(a, b, pairs=pairs)
    assert "chosen on the 3 validation pairs" in caplog.text
    assert picked(caplog.text) in ("2", "3")
    # Full matching maps A's dark region onto B's bright one's levels.
    assert scores(tf, held_out) > scores(fit(a, b, tone_quantiles=FULL_DETAIL), held_out) + 3


def test_pairs_leave_the_first_stage_out_when_every_fit_is_worse_than_the_input(caplog: pytest.LogCaptureFixture) -> None:
    a, b, pairs, held_out = content_domains(lambda x: x)  # no look at all: only the content differs
    with caplog.at_level(logging.INFO, logger="dicom_node.train"):
        tf = fit(a, b, pairs=pairs)
    assert "first stage left out (the identity, with the level the pairs give it, if any): every fit scored below the " \
           "input on the 3 validation pairs" in caplog.text
    x = held_out[0][0]
    with torch.no_grad():
        assert np.allclose(tf(torch.from_numpy(x)[None, None])[0, 0].numpy(), x, atol=1e-5)  # the identity


def test_pairs_keep_full_curves_for_a_strongly_nonlinear_look_on_alike_content(caplog: pytest.LogCaptureFixture) -> None:
    def look(x: np.ndarray) -> np.ndarray:  # a strong S-curve: no gain and offset comes near it
        return np.tanh(3.0 * x).astype(np.float32)

    a = [anatomy(s, (-0.5, 0.5)[s % 2]) for s in range(4)]
    b = [look(anatomy(s, (-0.5, 0.5)[s % 2])) for s in range(10, 14)]
    pairs = [(x, look(x)) for x in (anatomy(s, (-0.5, 0.5)[s % 2]) for s in range(20, 23))]
    with caplog.at_level(logging.INFO, logger="dicom_node.train"):
        tf = fit(a, b, pairs=pairs)
    assert picked(caplog.text) in ("all", "9")
    held_out = [(x, look(x)) for x in (anatomy(s, (-0.5, 0.5)[s % 2]) for s in range(30, 34))]
    assert scores(tf, held_out) > scores(fit(a, b, tone_quantiles=2), held_out) + 3


def test_without_pairs_the_curves_match_the_default_quantiles(caplog: pytest.LogCaptureFixture) -> None:
    a, b, _, _ = content_domains(lambda x: x)
    with caplog.at_level(logging.INFO, logger="dicom_node.train"):
        default = fit(a, b)
    assert f"tone curves through {DEFAULT_TONE_QUANTILES} quantiles (no validation pairs" in caplog.text
    assert torch.equal(default.tone_in, fit(a, b, tone_quantiles=DEFAULT_TONE_QUANTILES).tone_in)
    assert not torch.equal(default.tone_in, fit(a, b, tone_quantiles=FULL_DETAIL).tone_in)


def test_a_stage_that_ruins_one_validation_pair_loses_to_the_identity_though_it_wins_the_others() -> None:
    """The pairs' errors are pooled, not their PSNRs averaged: an S-curve exact on two pairs and
    far off on the third (whose look bends the other way) wins a mean of PSNRs, 39 dB to 24, but
    its pooled error is larger than the identity's (22.6 dB against 23.9).  What a patient's
    image risks is the worst pair."""
    curved = ToneFilter()
    curved.tone_in.copy_(torch.tanh(2 * curved.tone_in) / np.tanh(2))  # an S-curve
    rng = np.random.default_rng(0)
    xs = [anatomy(s, 0.0) for s in range(3)]

    def near(y: torch.Tensor | np.ndarray, db: float) -> np.ndarray:  # y with noise at about db PSNR (range 2)
        noisy = np.asarray(y, np.float64) + rng.standard_normal(SIZE * SIZE).reshape(SIZE, SIZE) * 2 * 10 ** (-db / 20)
        return noisy.astype(np.float32)

    with torch.no_grad():
        looks = [curved(torch.from_numpy(x)[None, None])[0, 0] for x in xs]
    opposite = 2 * xs[2] - looks[2].numpy()  # the third pair's look bends the other way
    pairs = [(xs[0], near(looks[0], 50)), (xs[1], near(looks[1], 50)), (xs[2], near(opposite, 50))]
    assert choose_tone_detail({2: curved, 0: ToneFilter()}, pairs) == 0
    assert choose_tone_detail({2: curved, 0: ToneFilter()}, pairs[:2]) == 2  # the curve, where it is right


def written(tf: ToneFilter, pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean PSNR as written (no gain and offset: what the node sends), clamped as the generator clamps."""
    with torch.no_grad():
        return float(np.mean([psnr(tf(torch.from_numpy(x)[None, None])[0, 0].clamp(-1, 1).numpy().astype(np.float64),
                                   y.astype(np.float64), DATA_RANGE) for x, y in pairs]))


def test_a_level_fitted_on_pairs_is_exact_for_a_gain_and_offset_and_refuses_an_inversion() -> None:
    xs = [anatomy(s, 0.3) * 0.8 for s in range(3)]
    pairs = [(x, (0.9 * x - 0.1).astype(np.float32)) for x in xs]
    leveled = fit_level(ToneFilter(), pairs)
    assert written(leveled, pairs) > 80 and written(ToneFilter(), pairs) < 30
    inverted = [(x, -x) for x in xs]  # no gain within LEVEL_GAIN_LIMITS: left as fitted
    stage = ToneFilter()
    assert fit_level(stage, inverted) is stage
    assert fit_level(stage, [(x, x) for x in xs]) is stage  # already exact: nothing to fit
    assert fit_level(stage, pairs[:1]) is stage  # one pair cannot show that its level holds for another


def test_a_level_that_differs_from_pair_to_pair_is_not_fitted() -> None:
    """Offsets of +0.3, -0.3 and +0.3: fitted on all three, +0.1 would lower their pooled error
    (0.08 against 0.09), but fitted on any two it misses the third by more than leaving it
    alone: that level is each image's content, not the look."""
    xs = [anatomy(s, 0.0) * 0.6 for s in range(3)]
    pairs = [(x, (x + d).astype(np.float32)) for x, d in zip(xs, (0.3, -0.3, 0.3))]
    stage = ToneFilter()
    assert fit_level(stage, pairs) is stage
    assert fit_level(stage, [(x, (x + 0.3).astype(np.float32)) for x in xs]) is not stage  # the same offset: fitted


def test_the_log_line_of_the_level_names_the_reason_it_was_left_as_fitted() -> None:
    from dicom_node.train.stage_choice import fit_level_saying

    xs = [anatomy(s, 0.0) * 0.6 for s in range(3)]
    stage = ToneFilter()
    reasons = {"one validation pair cannot show": [(xs[0], xs[0] + 0.3)],
               "its gain, -1.00, is beyond 0.5 to 2.0": [(x, -x) for x in xs],
               "does not bring pair 1 closer as written": [(x, x + d) for x, d in zip(xs, (0.3, -0.3, 0.3))]}
    for reason, pairs in reasons.items():
        leveled, said = fit_level_saying(stage, pairs)
        assert leveled is stage and said.startswith("output level left as fitted") and reason in said, said
    leveled, said = fit_level_saying(stage, [(x, x + 0.3) for x in xs])
    assert leveled is not stage and said.startswith("output level fitted on the 3 validation pairs"), said


def test_pairs_put_back_the_output_level_that_a_content_difference_moved(caplog: pytest.LogCaptureFixture) -> None:
    """A's images show a dark region, B's a bright one, in a softer, brighter look: matching the two
    domains' distributions reads B's bright content as a brighter look, so the output level lands
    too high.  The validation pairs put it back: as written, the held-out pairs come closer by
    several dB, while their look (after each image's best gain and offset) stays as fitted."""
    a, b, pairs, held_out = content_domains(lambda x: (0.8 * np.tanh(1.2 * x) + 0.1).astype(np.float32))
    with caplog.at_level(logging.INFO, logger="dicom_node.train"):
        tf = fit(a, b, pairs=pairs)
    assert "output level fitted on the 3 validation pairs" in caplog.text
    unleveled = fit(a, b, tone_quantiles=FULL_DETAIL if picked(caplog.text) == "all" else int(picked(caplog.text)))
    assert written(tf, held_out) > written(unleveled, held_out) + 6  # measured 39.4 against 28.2 dB
    assert scores(tf, held_out) > scores(unleveled, held_out) - 0.1  # the same look: 41.0 both

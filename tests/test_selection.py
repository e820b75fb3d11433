"""Never ship a model worse than its own first stage (train/selection.py, train/export.py).

The first stage (tone filter) of a residual generator is what it is with its network's last
convolution zeroed; a network that damages images loses to it on true pairs and on the
pseudo-pairs made without any, and brings its outputs no closer to the target domain's band
distribution; the trainer keeps the best checkpoint and exports a direction whose network does
not beat its first stage as that stage alone.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from factory import phantom
from test_intensity import _train, _train_data

from dicom_node.engine import load_style_model, translate
from dicom_node.engine.generator import ResnetGenerator
from dicom_node.train.band_distance import BandDistance
from dicom_node.train.criteria import MARGIN_DB
from dicom_node.train.export import _network_or_first_stage, load_checkpoint
from dicom_node.train.selection import CheckpointSelector, first_stage, network_gain, pseudo_pairs, zero_network


def _toned(seed: int = 0) -> ResnetGenerator:
    """A residual generator with a non-trivial tone filter (a gamma-like curve, sharpening)."""
    gen = ResnetGenerator(ngf=4, n_blocks=1, residual=True, tone_filter=True)
    with torch.no_grad():
        gen.tone_filter.tone_in.copy_(torch.linspace(-1, 1, gen.tone_filter.knots) ** 3 * 0.5
                                      + torch.linspace(-1, 1, gen.tone_filter.knots) * 0.5)
        gen.tone_filter.gains[:2] = 1.5
        for m in gen.model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
    return gen.eval()


def _images(n=3, size=96):
    return [phantom(size, size, 12, seed=40 + i).astype(np.float32) / 2047.5 - 1 for i in range(n)]


def test_a_zeroed_network_is_exactly_its_first_stage():
    gen = _toned()
    x = _images(1)[0]
    from dicom_node.engine.model_file import StyleModel

    out = translate(StyleModel(generator=zero_network(gen)), x, tile=0)
    np.testing.assert_array_equal(out, first_stage(gen)(x))
    assert np.abs(first_stage(gen)(x) - x).mean() > 0.01  # the stage does something
    assert network_gain(zero_network(gen), [("x", x, first_stage(gen)(x))]) == 0.0


def test_a_damaging_network_loses_to_its_first_stage_on_true_and_on_pseudo_pairs():
    """The true style is the first stage; a network adding noisy structure on top scores below it,
    with the true pairs and without them (pseudo-pairs from the target images)."""
    good = zero_network(_toned())
    bad = _toned(seed=3)
    with torch.no_grad():  # a network that adds a lot: its output convolution made strong
        [m for m in bad.modules() if isinstance(m, torch.nn.Conv2d)][-1].weight.mul_(20)
    reverse = _toned(seed=5)  # B->A's first stage, for the pseudo-pairs
    xs = _images()
    true_pairs = [(f"t{i}", x, first_stage(good)(x)) for i, x in enumerate(xs)]
    targets = [y for _, _, y in true_pairs]
    for pairs in (true_pairs, pseudo_pairs(reverse, targets)):
        assert network_gain(bad, pairs) < -1.0
        assert network_gain(good, pairs) == 0.0


def test_a_network_that_wins_two_pairs_and_ruins_one_does_not_beat_its_first_stage():
    """The pairs' squared errors are pooled, not their PSNR differences averaged: a network exact
    on two pairs and 3 times further off than its first stage on the third scored +60 dB as a
    mean of differences (each exact pair counts up to the 100 dB cap), but what a patient's image
    risks is the third pair."""
    from dicom_node.engine.model_file import StyleModel

    gen = _toned(seed=3)
    with torch.no_grad():  # a network that clearly changes its first stage's output
        [m for m in gen.modules() if isinstance(m, torch.nn.Conv2d)][-1].weight.mul_(5)
    xs = _images()
    outs = [translate(StyleModel(generator=gen), x, tile=0) for x in xs]
    stages = [first_stage(gen)(x) for x in xs]
    assert all(np.abs(o - t).mean() > 0.01 for o, t in zip(outs, stages))
    pairs = [("t0", xs[0], outs[0]), ("t1", xs[1], outs[1]),
             ("t2", xs[2], stages[2] - 2 * (outs[2] - stages[2]))]  # the style moves the other way
    gain = network_gain(gen, pairs)
    assert -2.5 < gain < -1.0  # about 10 log10(2/3): 3² against 2² + 1 + 1 of the residual's energy
    assert network_gain(gen, pairs[:2]) > 40  # where it is right, by far


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    from dicom_node.engine.tone_filter import band_split

    return band_split(torch.from_numpy(img)[None, None], [sigma])[-1][0, 0].numpy()


def _styled(img: np.ndarray) -> np.ndarray:
    """A vendor-like look: a tone curve, then amplitude-dependent local contrast (small details
    lifted, large ones compressed)."""
    toned = np.tanh(1.6 * img) / np.tanh(1.6)
    detail = toned - _blur(toned.astype(np.float32), 4.0)
    return np.clip(toned + 1.5 * np.tanh(4 * detail) / 4 - 0.5 * detail, -1, 1).astype(np.float32)


def test_the_band_distance_sees_a_nonlinear_look_and_its_absence():
    """B's own unseen images are close to B; A's images, or A through the tone curve alone
    (what a global first stage can do), are further; A through the whole look is as close as B's
    own."""
    a_train, a_test = _images(4, 128), [phantom(128, 128, 12, seed=90 + i).astype(np.float32) / 2047.5 - 1
                                       for i in range(3)]
    distance = BandDistance([_styled(x) for x in a_train])
    whole = distance([_styled(x) for x in a_test])
    tone_only = distance([np.tanh(1.6 * x) / np.tanh(1.6) for x in a_test])
    assert whole < 0.5 * tone_only < 0.5 * distance(a_test)
    assert distance([_blur(_styled(x), 1.0) for x in a_test]) > 2 * whole  # a blur is seen too


def test_unpaired_selection_by_band_distribution_scores_networks_against_their_first_stage():
    """A zero network is exactly its first stage (gain 0); one that adds strong structure brings
    its outputs further from B (a negative gain)."""
    from types import SimpleNamespace

    xs = _images(4, 128)
    a, b = SimpleNamespace(arrays=xs), SimpleNamespace(arrays=[_styled(x) for x in _images(4, 128)[::-1]])
    gen, reverse = zero_network(_toned()), zero_network(_toned(seed=5))
    bad = _toned(seed=3)
    with torch.no_grad():
        [m for m in bad.modules() if isinstance(m, torch.nn.Conv2d)][-1].weight.mul_(20)
    selector = CheckpointSelector("auto", Path("unused"))
    assert selector.gains(gen, reverse, (a, b), []) == {"gain_a2b": 0.0, "gain_b2a": 0.0}
    assert selector.criterion == "band distribution"
    assert selector.gains(bad, reverse, (a, b), [])["gain_a2b"] < -1.0


@pytest.mark.parametrize("gain, by, network_kept", [(0.4, None, True), (0.0, None, False), (-1.2, None, False),
                                                    (None, None, True), (0.4, "true pairs", True),
                                                    (0.65, "pseudo-pairs", False), (1.2, "pseudo-pairs", True),
                                                    (0.3, "band distribution", False), (0.8, "band distribution", True)])
def test_export_keeps_the_network_only_when_it_beat_its_first_stage(gain, by, network_kept):
    """Without pairs by a margin (train.criteria.MARGIN_DB): +0.65 dB on pseudo-pairs was a
    network 1.9 dB below its tone filter on true pairs (bench/quality.py, multiscale@real); no
    unpaired network scored above +0.29 dB of band distance (bench/selection.py)."""
    gen = _toned()
    meta = {"validation": {} if gain is None else {"gain_a2b": gain}, **({"gain_by": by} if by else {})}
    out, note = _network_or_first_stage(gen, meta, "g_ab")
    last = [m for m in out.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    assert bool(last.weight.abs().sum() > 0) is network_kept
    assert note["stage"] == ("network" if network_kept else "tone filter alone")


def test_a_run_exports_its_best_checkpoint_and_says_what_it_exported(tmp_path, capsys):
    from dicom_node.cli import main

    data = _train_data(tmp_path / "data")
    assert _train(tmp_path, data, 2) == 0
    assert _train(tmp_path, data, 6) == 0  # resumed: checkpoints at 4 and 6 compete with step 2's
    run = tmp_path / "run"
    with open(run / "metrics.csv", newline="") as f:
        gains = {int(r["step"]): float(r["gain_a2b"]) for r in csv.DictReader(f) if r.get("gain_a2b")}
    assert sorted(gains) == [2, 4, 6]
    best_step = max(gains, key=gains.get)
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["step"] == best_step
    for direction, key in (("A2B", "gain_a2b"), ("B2A", "gain_b2a")):
        model = load_style_model(run / "models" / f"run_{direction}.safetensors")
        exported = model.metadata["provenance"]["exported"]
        gain = best["meta"]["validation"][key]
        assert model.version == str(best_step) and exported["gain_db"] == round(gain, 3)
        last = [m for m in model.generator.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        capsys.readouterr()
        assert main(["model", "info", str(model.path), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["exported"] == exported
        margin = MARGIN_DB.get(best["meta"]["gain_by"], 0.0)
        if gain > margin:
            assert exported["stage"] == "network" and last.weight.abs().sum() > 0
        else:
            assert exported["stage"] == "tone filter alone" and last.weight.abs().sum() == 0


def test_paired_training_is_judged_on_its_own_pairs_and_unpaired_on_the_band_distribution(tmp_path, caplog):
    """A paired run without data.val uses its own pairs; an unpaired one the band distribution."""
    import logging

    from factory import make_dataset, write

    paired = tmp_path / "paired"
    for sub in ("A", "B"):
        (paired / sub).mkdir(parents=True)
    for i in range(2):
        pix = phantom(96, 96, 12, seed=60 + i)
        write(make_dataset(pix), paired / "A" / f"p{i}.dcm")
        write(make_dataset((4095 * (pix / 4095.0) ** 0.7).round().astype(np.uint16)), paired / "B" / f"p{i}.dcm")
    for sub in ("p", "u"):
        (tmp_path / sub).mkdir()
    with caplog.at_level(logging.INFO, logger="dicom_node.train"):
        assert _train(tmp_path / "p", paired, 2) == 0
    assert "network over its first stage (true pairs)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dicom_node.train"):
        assert _train(tmp_path / "u", _train_data(tmp_path / "data", n=2), 2) == 0
    assert "network over its first stage (band distribution)" in caplog.text


def test_with_true_pairs_the_first_stage_is_scored_against_the_input_and_a_loss_is_warned(tmp_path, caplog):
    """Only pairs can show a first stage worse than changing nothing (domains that differ in
    content: docs/training.md); the selector scores it once and says so."""
    import logging

    from dicom_node.train.selection import OVER_INPUT_KEYS, CheckpointSelector, first_stage_over_input

    gen = zero_network(_toned())
    xs = _images(2)
    styled = [(f"s{i}", x, first_stage(gen)(x)) for i, x in enumerate(xs)]  # the stage is the style
    unchanged = [(f"u{i}", x, x) for i, x in enumerate(xs)]  # the style is no change at all
    assert first_stage_over_input(gen, styled) > 10
    assert first_stage_over_input(gen, unchanged) < -10
    selector = CheckpointSelector("pairs", tmp_path)
    with caplog.at_level(logging.INFO, logger="dicom_node.train"):
        out = selector.gains(gen, gen, (None, None), unchanged)
    assert out[OVER_INPUT_KEYS[0]] == pytest.approx(first_stage_over_input(gen, unchanged))
    assert "A->B: the first stage is" in caplog.text and "worse than the input" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dicom_node.train"):
        again = selector.gains(gen, gen, (None, None), unchanged)  # scored once, kept in every checkpoint's meta
    assert again[OVER_INPUT_KEYS[1]] == out[OVER_INPUT_KEYS[1]] and "worse than the input" not in caplog.text
    pseudo = CheckpointSelector("pseudo", tmp_path).gains(gen, gen, (type("D", (), {"arrays": xs})(),) * 2, [])
    assert not set(OVER_INPUT_KEYS) & set(pseudo)  # without pairs there is nothing to tell


@pytest.mark.parametrize("gain, first, over", [(0.4, -1.0, -0.6), (-1.2, -1.0, -1.0), (0.4, 2.0, 2.4), (0.4, None, None)])
def test_export_says_how_the_exported_model_compares_with_the_input(gain, first, over, caplog):
    import logging

    validation = {"gain_a2b": gain, **({} if first is None else {"first_stage_over_input_a2b": first})}
    with caplog.at_level(logging.WARNING, logger="dicom_node.train"):
        _, note = _network_or_first_stage(_toned(), {"validation": validation, "gain_by": "true pairs"}, "g_ab")
    assert note.get("over_input_db") == (None if over is None else pytest.approx(over))
    assert ("worse than the input" in caplog.text) is (over is not None and over < 0)


def test_a_better_level_does_not_hide_a_worse_look_nor_the_reverse():
    """The gain is the lesser of the pooled gain as written and after gain and offset: a network
    that moves a first stage's wrong level right but adds structure of its own is no better
    (bench/README.md, "Unpaired quality": with pairs the network was exported on the real crops
    for its level and lost 2.9 dB of look to its first stage).  A level fixed and the look kept
    exactly gains nothing: a network must not be worse in either to be kept."""
    from dicom_node.train.pair_scores import pooled_gain_db

    rng = np.random.default_rng(0)
    xs = _images()
    targets = [x * 0.8 + 0.3 for x in xs]  # B: less contrast, and brighter
    stage = [x * 0.8 for x in xs]  # the look right, the level 0.3 too dark
    network = [y + rng.standard_normal(y.shape) * 0.05 for y in targets]  # the level right, noise added
    as_written = 10 * np.log10(0.3 ** 2 / 0.05 ** 2)  # +15.6 dB
    assert pooled_gain_db(list(zip(network, targets)), list(zip(stage, targets))) < -20  # the look: exact against noisy
    assert pooled_gain_db(list(zip(stage, targets)), list(zip(network, targets))) < -as_written + 1  # the reverse
    assert pooled_gain_db(list(zip(targets, targets)), list(zip(stage, targets))) == 0.0  # the level alone: no gain
    rough = [s + rng.standard_normal(s.shape) * 0.05 for s in stage]  # a stage off in both
    fine = [y + rng.standard_normal(y.shape) * 0.01 for y in targets]  # the level right, little noise
    assert pooled_gain_db(list(zip(fine, targets)), list(zip(rough, targets))) > 10  # better in both: a gain

"""train.lambda_coarse: the network's change over its first stage, averaged over blocks, costs."""
from __future__ import annotations

import math

import pytest
import torch

from dicom_node.engine.yaml_config import ConfigError
from dicom_node.train.config import parse_train_config
from dicom_node.train.cyclegan import CycleGAN
from dicom_node.train.losses import coarse_change_loss


def test_a_level_shift_costs_and_detail_that_averages_out_over_a_block_does_not() -> None:
    first = torch.rand(1, 1, 64, 64) * 2 - 1
    checker = (torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2 * 0.2 - 0.1  # +-0.1, fine detail
    assert coarse_change_loss(first + 0.1, first, 16).item() == pytest.approx(0.1, abs=1e-6)
    assert coarse_change_loss(first + checker, first, 16).item() == pytest.approx(0.0, abs=1e-6)
    half = torch.zeros(64, 64)
    half[:, :32] = 0.1  # a large-scale contrast change: one side lifted
    assert coarse_change_loss(first + half, first, 16).item() == pytest.approx(0.05, abs=1e-6)


def _flat_change(model: CycleGAN, change: float) -> None:
    """Both generators add ``tanh(bias)`` = ``change`` everywhere (last convolution's weights zero)."""
    for name in ("g_ab", "g_ba"):
        last = [m for m in model.generator(name).model if isinstance(m, torch.nn.Conv2d)][-1]
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.constant_(last.bias, math.atanh(change))


@pytest.mark.parametrize("weight", [0.0, 10.0])
def test_the_step_adds_the_weighted_coarse_change_of_both_generators(weight: float) -> None:
    model = CycleGAN(ngf=4, n_blocks=1, ndf=4, residual=True, tone_filter=True, lambda_identity=0.0,
                     lambda_coarse=weight, coarse_size=16)
    _flat_change(model, 0.1)
    a, b = torch.rand(1, 1, 64, 64) * 0.5 - 0.25, torch.rand(1, 1, 64, 64) * 0.5 - 0.25
    losses = model.step(a, b)
    assert losses["coarse"].item() == pytest.approx(2 * weight * 0.1, rel=1e-4)


def test_the_trainer_config_reads_the_weight_and_refuses_a_block_of_zero(tmp_path) -> None:
    data = {"a": str(tmp_path), "b": str(tmp_path)}
    cfg = parse_train_config({"data": data, "train": {"lambda_coarse": 10, "coarse_size": 32}})
    assert (cfg.train.lambda_coarse, cfg.train.coarse_size) == (10.0, 32)
    with pytest.raises(ConfigError, match="train.coarse_size: must be >= 1"):
        parse_train_config({"data": data, "train": {"coarse_size": 0}})

"""One rule for device names and one for tile sizes (engine/devices.py), shared by the config,
the command line and the engine."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dicom_node.cli import main
from dicom_node.config.schema import parse_schema
from dicom_node.engine import new_style_model, translate
from dicom_node.engine.devices import MIN_TILE, MIN_USER_TILE, device_problem, tile_problem
from dicom_node.engine.model_file import StyleModel
from dicom_node.engine.tiling import resolve_device
from dicom_node.errors import UserError


def _model_problems(**model) -> list[str]:
    raw = {"models": {"m": {"path": "default", **model}}, "destinations": {"out": {"type": "folder", "path": "out"}},
           "routes": [{"called_ae": "X", "model": "m", "destinations": ["out"]}]}
    return [p for p in parse_schema(raw)[1] if p.startswith("models.m.")]


def test_config_and_engine_agree_on_device_names() -> None:
    for name in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert device_problem(name) is None and _model_problems(device=name) == []
    assert _model_problems(device="gpu") == [f"models.m.device: {device_problem('gpu')}"]
    with pytest.raises(UserError, match="unsupported device 'gpu'"):
        resolve_device("gpu")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_is_a_device_the_engine_knows_but_this_machine_lacks() -> None:
    with pytest.raises(UserError, match="MPS is not available"):
        resolve_device("mps")


def test_one_tile_rule_for_config_cli_and_engine(tmp_path) -> None:
    small = MIN_USER_TILE - 4
    assert tile_problem(small) == f"must be 0 (whole image) or >= {MIN_USER_TILE} pixels"
    assert _model_problems(tile=small) == [f"models.m.tile: {tile_problem(small)}"]
    assert _model_problems(tile=0) == [] and _model_problems(tile=MIN_USER_TILE) == []
    assert main(["translate", "--model", "default", "-o", str(tmp_path), "--tile", str(small),
                 str(tmp_path / "x.dcm")]) == 1
    model = StyleModel(generator=new_style_model(ngf=4, n_blocks=1).eval())
    image = np.zeros((40, 40), np.float32)
    assert translate(model, image, tile=MIN_TILE).shape == (40, 40)  # the API allows what the executor can do
    with pytest.raises(UserError, match=f"at least {MIN_TILE}"):
        translate(model, image, tile=MIN_TILE - 4)

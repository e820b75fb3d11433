"""One strict YAML loader for the node config and the trainer config (engine/yaml_config.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.config import load_config
from dicom_node.engine.yaml_config import ConfigError
from dicom_node.train.config import load_train_config


def test_trainer_config_reports_duplicate_keys_with_their_line(tmp_path: Path) -> None:
    path = tmp_path / "train.yaml"
    path.write_text("data:\n  a: A\n  b: B\ntrain:\n  steps: 10\n  steps: 20\n  nope: 1\n")
    with pytest.raises(ConfigError) as info:
        load_train_config(path)
    problems = info.value.problems
    assert problems[0] == "<yaml> line 6: duplicate key 'steps'"
    assert "train.nope: unknown key" in problems  # every problem at once


@pytest.mark.parametrize("loader", [load_config, load_train_config])
def test_both_configs_report_yaml_errors_with_line_and_column(tmp_path: Path, loader) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("a: [1, 2\nb: 3\n")
    with pytest.raises(ConfigError) as info:
        loader(path)
    assert len(info.value.problems) == 1 and info.value.problems[0].startswith("<yaml> line ")
    assert " column " in info.value.problems[0]

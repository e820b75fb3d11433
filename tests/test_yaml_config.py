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


def _nested(depth: int) -> str:
    return "node: " + "[" * depth + "]" * depth + "\n"


@pytest.mark.parametrize("loader", [load_config, load_train_config])
def test_a_document_nested_20000_deep_is_one_problem_not_a_recursion_error(tmp_path: Path, loader) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text(_nested(20_000))
    with pytest.raises(ConfigError) as info:
        loader(path)
    assert info.value.problems == ["<yaml> line 1 column 56: nested more than 50 levels deep"]


def test_nesting_up_to_the_limit_is_read() -> None:
    from dicom_node.engine.yaml_config import MAX_NESTING, load_yaml_text

    doc, _ = load_yaml_text(_nested(MAX_NESTING - 1))  # the root mapping is one level
    depth, value = 0, doc["node"]
    while value:
        depth, value = depth + 1, value[0]
    assert depth == MAX_NESTING - 2


def test_reload_reads_a_config_that_breaks_the_parser_as_a_problem(tmp_path: Path, monkeypatch) -> None:
    """Whatever escapes reading or validating (here PyYAML's own RecursionError, the limit lifted)
    is a one-line problem of that reload, never an exception that stops the node."""
    from dicom_node import reload
    from dicom_node.engine import yaml_config

    path = tmp_path / "deep.yaml"
    path.write_text(_nested(20_000))
    monkeypatch.setattr(yaml_config, "MAX_NESTING", 10**9)
    config, problems = reload.read_config(path)
    assert config is None and len(problems) == 1 and "RecursionError" in problems[0] and "\n" not in problems[0]

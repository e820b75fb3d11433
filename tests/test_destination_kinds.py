"""A destination kind is one class and one registry line: nothing else in the node names a kind.

Why: the config loader, check-config, the console and the deliverers used to know the kinds by
name (and showed any non-DICOM kind as a folder).  Here a kind that exists only in this file
(``type: memo``, which notes the SOP Instance UIDs it is given) is registered by one line and
then goes the whole way: its keys are parsed and validated by the config loader with their YAML
paths, its machine check runs with check-config, check-config and the console describe it in
its own words, and a running node delivers a translated study to it over a real association.
"""
from __future__ import annotations

import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pydicom
import pytest
import yaml

from dicom_node.cli import main
from dicom_node.config import ConfigError, DestinationSettings, parse_config
from dicom_node.config.fields import string
from dicom_node.destinations import KINDS, DeliveryResult, DestinationKind, kind_names, register, unregister
from dicom_node.engine.yaml_config import Problems, join_path
from dicom_node.node import Node
from dicom_node.web.auth import hash_password
from tests.nodeproc import free_port, node_config, send, wait_for
from tests.test_node import study


@dataclass
class MemoDestination(DestinationSettings):
    name: str
    type: str = "memo"
    note: str | None = None


class MemoKind(DestinationKind[MemoDestination]):
    """Keeps the SOP Instance UIDs it was given (the whole of its 'delivery')."""

    type = "memo"
    keys = frozenset({"note"})
    required = frozenset({"note"})

    def __init__(self) -> None:
        self.received: list[str] = []

    def parse(self, name: str, raw: dict[str, Any], path: str, problems: Problems,
              base_dir: Path) -> MemoDestination:
        raw = self.fields(raw, path, problems)
        return MemoDestination(name=name, note=string(raw, "note", path, problems))

    def check(self, dest: MemoDestination, path: str, problems: Problems) -> None:
        if dest.note == "unreachable":
            problems.add(join_path(path, "note"), "cannot reach the memo pad")

    def describe(self, dest: MemoDestination) -> str:
        return f"memo pad {dest.note}"

    def deliver(self, dest: MemoDestination, files: Sequence[Path], *, calling_ae: str,
                timeout: float) -> list[DeliveryResult]:
        self.received += [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
        return [DeliveryResult(Path(f), True) for f in files]


@pytest.fixture()
def memo():
    kind = register(MemoKind())  # the one registry line
    yield kind
    unregister(kind)


def _raw(tmp_path: Path, model: Path, pad: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return node_config(tmp_path, port=free_port(), model_path=model, destinations={"pad": pad},
                       routes=[{"called_ae": "MEMO_STYLE", "model": "tiny", "destinations": ["pad"]}],
                       stable=0.2, **extra)


def test_the_config_loader_parses_and_checks_a_registered_kind(memo, tmp_path, tiny_model_path):
    cfg = parse_config(_raw(tmp_path, tiny_model_path, {"type": "memo", "note": "blue"}), base_dir=tmp_path)
    dest = cfg.destinations["pad"]
    assert isinstance(dest, MemoDestination) and dest.note == "blue"
    assert isinstance(DestinationSettings(name="pad", type="memo", note="x"), MemoDestination)

    for pad, expected in [
        ({"type": "memo"}, "destinations.pad.note: required key missing"),
        ({"type": "memo", "note": "x", "host": "h"}, "destinations.pad.host: unknown key"),
        ({"type": "memo", "note": 5}, "destinations.pad.note: must be a non-empty string, not an integer"),
        ({"type": "memo", "note": "unreachable"}, "destinations.pad.note: cannot reach the memo pad"),  # check()
    ]:
        with pytest.raises(ConfigError) as info:
            parse_config(_raw(tmp_path, tiny_model_path, pad), base_dir=tmp_path)
        assert expected in info.value.problems, (pad, info.value.problems)
    assert kind_names().endswith("folder or memo")  # the list of known types in messages


def test_an_unregistered_kind_is_an_unknown_type(tmp_path, tiny_model_path):
    assert "memo" not in KINDS  # the fixture took it away again
    with pytest.raises(ConfigError) as info:
        parse_config(_raw(tmp_path, tiny_model_path, {"type": "memo", "note": "blue"}), base_dir=tmp_path)
    assert info.value.problems == [f"destinations.pad.type: must be {kind_names()}, not 'memo'"]


def test_check_config_describes_a_registered_kind_in_its_own_words(memo, tmp_path, tiny_model_path, capsys):
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(_raw(tmp_path, tiny_model_path, {"type": "memo", "note": "blue"})))
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "MEMO_STYLE -> model tiny" in out and "-> pad (memo memo pad blue)" in out, out

    path.write_text(yaml.safe_dump(_raw(tmp_path, tiny_model_path, {"type": "memo", "note": "unreachable"})))
    assert main(["check-config", str(path)]) == 1
    assert "destinations.pad.note: cannot reach the memo pad" in capsys.readouterr().out.splitlines()


def test_a_node_delivers_to_a_registered_kind_and_the_console_shows_it(memo, tmp_path, tiny_model_path):
    """C-STORE in, translated by the node, delivered by its deliverer to the memo kind; the
    console's overview describes the destination and /metrics counts the deliveries."""
    password = "memo pad password"
    raw = _raw(tmp_path, tiny_model_path, {"type": "memo", "note": "blue"},
               web={"port": 0, "users": {"alice": hash_password(password)}})
    sources = study(2)
    with Node(parse_config(raw, base_dir=tmp_path)) as node:
        assert send(node.port, sources, called="MEMO_STYLE") == [0, 0]
        assert wait_for(lambda: len(memo.received) == 2, 60), memo.received
        source_uids = {str(ds.SOPInstanceUID) for ds in sources}
        assert len(set(memo.received)) == 2 and not set(memo.received) & source_uids  # the restyled outputs

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPCookieProcessor())
        html = opener.open(node.web.url + "/login", timeout=15).read().decode()
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
        form = urllib.parse.urlencode({"csrf_token": csrf, "user": "alice", "password": password, "next": "/"})
        overview = opener.open(node.web.url + "/login", data=form.encode(), timeout=15).read().decode()
        table = overview[overview.index('id="destinations"'):]
        assert re.search(r"<td>pad</td><td>memo pad blue</td>", table), table[:600]

        metrics = opener.open(node.web.url + "/metrics", timeout=15).read().decode()
        assert 'dicom_node_deliveries_total{destination="pad",outcome="delivered"} 2.0' in metrics

"""What a reload applies and what needs a restart, derived from each setting's field metadata
(dicom_node.config.settings LIVE / RESTART, dicom_node.reload.plan)."""
from __future__ import annotations

import dataclasses
import urllib.request

from dicom_node import reload
from dicom_node.config import NodeConfig, load_config
from dicom_node.config.settings import EACH_FIELD, LIVE, RELOAD, RESTART
from dicom_node.node import Node
from tests.nodeproc import free_port, node_config, send, wait_for, write_config
from tests.postgres import postgres_server  # noqa: F401 - fixture
from tests.test_node import study


def _every_setting(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    out = []
    for f in dataclasses.fields(cls):
        out.append((prefix + f.name, f))
        if f.metadata.get(RELOAD) == EACH_FIELD[RELOAD]:
            out += _every_setting(f.default_factory().__class__, f"{prefix}{f.name}.")
    return out


def test_every_setting_says_whether_a_reload_applies_it():
    """A key added to the config without saying it is live or needs a restart fails here (a reload
    would otherwise report it neither as applied nor as needing a restart)."""
    kinds = {LIVE[RELOAD], RESTART[RELOAD], EACH_FIELD[RELOAD]}
    settings = _every_setting(NodeConfig)
    missing = [key for key, f in settings if f.metadata.get(RELOAD) not in kinds]
    assert not missing, f"say LIVE or RESTART in dicom_node/config/settings.py for: {', '.join(missing)}"
    keys = {key for key, _ in settings}
    assert {"node.port", "storage.database", "storage.lease_seconds", "routes", "web", "workers"} <= keys


def test_a_reload_changing_the_state_database_or_the_lease_needs_a_restart():
    old = NodeConfig()
    new = dataclasses.replace(old, storage=dataclasses.replace(
        old.storage, database="postgresql://dicom@db.example/state", lease_seconds=10.0, keep_sources_days=2.0,
        min_free_bytes=1))
    plan = reload.plan(old, new)
    assert plan.restart_needed == ["storage.database", "storage.lease_seconds"]
    assert plan.applied == ["storage.min_free_bytes changed", "storage.keep_sources_days changed"]
    running = plan.config.storage  # what the node takes now: the old database and lease, the new rest
    assert (running.database, running.lease_seconds) == (None, 30.0)
    assert (running.keep_sources_days, running.min_free_bytes) == (2.0, 1)
    assert reload.plan(old, old).changed is False


def test_a_running_node_reports_a_new_state_database_and_lease_as_needing_a_restart_and_keeps_serving(
        tmp_path, tiny_model_path, request):
    """A real node on SQLite is told to use a (real, reachable) PostgreSQL database and a shorter
    lease: the reload says both need a restart, and the node keeps its database and lease; what
    is live reaches every part (here the metrics' watermark)."""
    outbox = tmp_path / "outbox"
    cfg = node_config(tmp_path, port=free_port(), model_path=tiny_model_path, stable=0.3,
                      destinations={"out": {"type": "folder", "path": str(outbox)}},
                      routes=[{"called_ae": "DR_KIM", "model": "tiny", "destinations": ["out"]}],
                      web={"host": "127.0.0.1", "port": free_port()})
    cfg["storage"].pop("database", None)
    cfg_path = write_config(tmp_path / "node.yaml", cfg)
    node = Node(load_config(cfg_path), config_path=str(cfg_path))
    node.start()
    try:
        db_before = node.db.database
        beat = next(t for t in node._threads if t.name == "heartbeat")
        postgres = request.getfixturevalue("postgres_server")  # skips where PostgreSQL is not installed
        cfg["storage"].update(database=postgres.new_database(), lease_seconds=9, keep_sources_days=1,
                              min_free_bytes=12345)
        write_config(cfg_path, cfg)
        result = node.reload()
        assert result["ok"], result
        assert result["restart_needed"] == ["storage.database", "storage.lease_seconds"]
        assert result["changes"] == ["storage.min_free_bytes changed", "storage.keep_sources_days changed"]
        with urllib.request.urlopen(f"{node.web.url}/metrics", timeout=10) as answer:  # configured too
            assert "dicom_node_spool_min_free_bytes 12345.0" in answer.read().decode()
        assert node.config.storage.database is None and node.config.storage.lease_seconds == 30.0
        assert node.config.storage.keep_sources_days == 1
        assert node.db.database is db_before and node.db.cluster.lease_seconds == 30.0
        assert beat.interval == 10.0  # a third of the lease it started with
        assert send(node.port, study(1), called="DR_KIM") == [0]  # the old database serves on
        assert wait_for(lambda: len(list(outbox.rglob("*.dcm"))) == 1, 30)
    finally:
        node.stop()


"""The node's delivery: a destination that is down is retried and then delivered, one that
never answers does not hold up the others, and a given-up delivery comes back by `dicom-node retry`."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from dicom_node.config import parse_config
from dicom_node.node import Node
from tests.nodeproc import Receiver, folder_uids, node_config, send, wait_for
from tests.postgres import both_backends, postgres_server  # noqa: F401 - fixtures
from tests.test_node import instance_states, make_node, study

pytestmark = pytest.mark.usefixtures("both_backends")  # every test on SQLite and on PostgreSQL


def test_destination_down_retried_then_delivered(tmp_path, tiny_model_path):
    from tests.nodeproc import free_port

    port = free_port()
    node = make_node(tmp_path, tiny_model_path,
                     destinations={"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": port,
                                            "timeout": 3}},
                     routes=[{"called_ae": "KIM", "model": "tiny", "destinations": ["pacs"]}],
                     retry={"max_attempts": 50, "backoff_seconds": [0.2, 0.4]})
    with node:
        sources = study(2)
        assert send(node.port, sources, called="KIM") == [0, 0]

        def attempts() -> int:
            rows = node.db.database.query("SELECT MIN(attempts) FROM deliveries WHERE state='pending'")
            return rows[0][0] or 0

        assert wait_for(lambda: attempts() >= 2, 20)  # failed at least twice, still pending
        with Receiver("PACS", port=port) as pacs:
            assert wait_for(lambda: len(pacs.received) == 2, 20)
            assert wait_for(lambda: set(instance_states(node).values()) == {"delivered"}, 10)
            time.sleep(0.5)
            assert len(pacs.received) == 2


def test_gives_up_after_max_attempts_then_retry_command(tmp_path, tiny_model_path, capsys):
    """After max_attempts the delivery is failed (file kept); `dicom-node retry` requeues it."""
    import yaml

    from dicom_node.cli import main
    from tests.nodeproc import free_port, refusing_port

    down = refusing_port()  # the PACS is down: refused, and its port not taken by anyone else meanwhile
    port = down.getsockname()[1]
    raw = node_config(tmp_path, port=free_port(), model_path=tiny_model_path,
                      destinations={"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                                             "port": port, "timeout": 3}},
                      routes=[{"called_ae": "KIM", "model": "tiny", "destinations": ["pacs"]}],
                      stable=0.2, retry={"max_attempts": 2, "backoff_seconds": [0.1]})
    cfg_path = tmp_path / "node.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    config = parse_config(raw, base_dir=tmp_path)
    config.node.port = 0
    with Node(config) as node:
        ds = study(1)[0]
        assert send(node.port, [ds], called="KIM") == [0]
        assert wait_for(lambda: instance_states(node)[str(ds.SOPInstanceUID)] == "failed", 20)
        assert main(["status", "--config", str(cfg_path)]) == 0
        out = capsys.readouterr().out
        assert "failed 1" in out
        assert "to pacs: pending 0  failed 1  (attempts up to 2)  last error: cannot connect" in out
        import json

        assert main(["status", "--json", "--config", str(cfg_path)]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["instances"]["failed"] == 1 and report["destinations"]["pacs"]["failed"] == 1
        kept = node.db.database.query("SELECT path FROM deliveries")[0][0]
        assert Path(kept).is_file()
        down.close()
        with Receiver("PACS", port=port) as pacs:
            assert main(["retry", "--config", str(cfg_path)]) == 0
            assert "requeued 1 failed deliveries" in capsys.readouterr().out
            assert wait_for(lambda: len(pacs.received) == 1, 20)
            assert wait_for(lambda: instance_states(node)[str(ds.SOPInstanceUID)] == "delivered", 10)


def test_a_hanging_destination_does_not_delay_the_others(tmp_path, tiny_model_path):
    """A peer that accepts TCP but never answers costs its own timeout, not the folder's delivery."""
    import socket

    hang = socket.socket()
    hang.bind(("127.0.0.1", 0))
    hang.listen(8)  # accepts connections (kernel backlog) and never speaks DICOM
    try:
        node = make_node(tmp_path, tiny_model_path,
                         destinations={"stuck": {"type": "dicom", "ae_title": "STUCK", "host": "127.0.0.1",
                                                 "port": hang.getsockname()[1], "timeout": 8},
                                       "outbox": {"type": "folder", "path": str(tmp_path / "outbox")}},
                         routes=[{"called_ae": "KIM", "model": "tiny", "destinations": ["stuck", "outbox"]}])
        with node:
            assert send(node.port, study(1), called="KIM") == [0]
            assert wait_for(lambda: len(folder_uids(tmp_path / "outbox")) == 1, 6)
            # the file lands before its row is marked delivered: wait briefly, well inside stuck's 8 s
            expected = [("outbox", "delivered"), ("stuck", "pending")]
            query = "SELECT destination, state FROM deliveries ORDER BY destination"
            wait_for(lambda: node.db.database.query(query) == expected, 1.5)
            assert node.db.database.query(query) == expected
            hang.close()  # resets the half-open connection, so stopping the node is quick
    finally:
        hang.close()

"""Events raised outside the node reach the outbox with the config's webhooks.

The node, its console and every CLI command open the state database through their config
(``StateDB.for_config``), so a change an operator makes from the command line raises its
webhook events as the node would.  Before, a CLI command's database had no webhooks and such
an event was dropped without a word.
"""
from __future__ import annotations

import pytest

from dicom_node.cli import main
from dicom_node.state import OutputRecord, StateDB
from tests.nodeproc import free_port, node_config, write_config
from tests.postgres import postgres_server  # noqa: F401 - fixture


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """The state database on each backend: a SQLite file in the spool, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_server").new_database()


def _withheld_study(db: StateDB) -> None:
    """What a node leaves behind: the only instance of its study translated, its output withheld,
    nothing else to deliver (so releasing it finishes the study)."""
    db.record_received(called_ae="KIM", calling_ae="CR1", sop_uid="1.2.3.4.5", sop_class="1.2.840.10008.5.1.4.1.1.1",
                       study_uid="1.2.3", series_uid="1.2.3.4", route="kim", matched=True, path="/spool/x.dcm",
                       size=10, now=1.0)
    db.studies.release_due(lambda route: (0.0, None, "proceed"), now=2.0)
    row = db.claim_ready(now=3.0)
    assert row is not None
    db.mark_translated(row.id, [], now=4.0, withhold=True, output=OutputRecord(
        source_sop_uid="1.2.3.4.5", output_sop_uid="9.9", model="tiny", model_version="1", model_digest="d",
        device_uid="2.25.1", verdict="flagged", reasons=["test"], scores={}, thresholds={}, action="withhold"))


def test_release_from_the_cli_raises_its_event_to_the_configured_webhooks(database, tmp_path, tiny_model_path,
                                                                          capsys):
    cfg = node_config(tmp_path, port=free_port(), model_path=tiny_model_path,
                      destinations={"outbox": {"type": "folder", "path": str(tmp_path / "outbox")}},
                      routes=[{"name": "kim", "called_ae": "KIM", "model": "tiny", "destinations": ["outbox"]}],
                      notifications=[{"name": "ops", "url": "http://127.0.0.1:9/hook", "events": ["study.delivered"]},
                                     {"name": "other", "url": "http://127.0.0.1:9/x", "events": ["delivery.failed"]}])
    cfg["storage"].pop("database", None)
    if database is not None:
        cfg["storage"]["database"] = database
    config = write_config(tmp_path / "node.yaml", cfg)
    target = database or tmp_path / "spool" / "state.db"
    (tmp_path / "spool").mkdir()
    db = StateDB(target)  # no webhooks here: only what the command raises is in the outbox
    _withheld_study(db)
    assert db.outbox.recent() == []
    db.close()

    assert main(["release", "--all", "--config", str(config)]) == 0
    assert "released 9.9" in capsys.readouterr().out

    db = StateDB(target)
    try:
        assert [(n["webhook"], n["event"], n["state"]) for n in db.outbox.recent()] == \
            [("ops", "study.delivered", "pending")]
        body = db.database.query("SELECT body FROM notifications")[0][0]
        assert '"node": "TESTNODE"' in body and '"study_uid": "1.2.3"' in body
        assert {r.sop_uid: r.state for r in db.instances()} == {"1.2.3.4.5": "delivered"}
    finally:
        db.close()

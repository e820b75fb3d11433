"""The SQLite state machine: receive -> ready -> translated -> delivered/failed, timers, retry."""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from dicom_node.state import NewDelivery, StateDB
from tests.postgres import postgres_server  # noqa: F401 - fixture


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    """The state database on each backend: a SQLite file, or a fresh database on a real PostgreSQL."""
    if request.param == "sqlite":
        return tmp_path / "state.db"
    return request.getfixturevalue("postgres_server").new_database()


def receive(db: StateDB, sop: str, study: str = "1.2.3", *, now: float, matched: bool = True, forward=()):
    return db.record_received(called_ae="KIM", calling_ae="CR1", sop_uid=sop, sop_class="1.2.840.10008.5.1.4.1.1.1",
                              study_uid=study, series_uid="1.2.3.4", route="kim", matched=matched,
                              path=f"/spool/{sop}.dcm", size=10, forward=forward, now=now)


def fixed(stable: float, max_wait: float | None = None, on_max_wait: str = "proceed"):
    """Study timers of one route: quiet period ``stable``, optional ``max_wait``."""
    return lambda route: (stable, max_wait, on_max_wait)


def states(db: StateDB) -> dict[str, str]:
    return {r.sop_uid: r.state for r in db.instances()}


def test_pragmas_and_permissions(tmp_path):
    db = StateDB(tmp_path / "state.db")
    assert db.database.query("PRAGMA journal_mode")[0][0] == "wal"
    assert db.database.query("PRAGMA synchronous")[0][0] == 2  # FULL
    assert oct(os.stat(tmp_path / "state.db").st_mode & 0o777) == "0o600"
    db.close()


def test_study_quiet_period_and_duplicates(database):
    db = StateDB(database)
    assert receive(db, "1.1", now=100.0)[1] is True
    receive(db, "1.2", now=104.0)
    assert receive(db, "1.1", now=108.0)[1] is False  # duplicate: not new, restarts the quiet period
    assert len(db.studies.release_due(fixed(5.0), now=112.0)) == 0  # 4 s after the duplicate
    assert set(states(db).values()) == {"received"}
    assert db.studies.next_deadline(fixed(5.0)) == 113.0
    assert len(db.studies.release_due(fixed(5.0), now=113.0)) == 1
    assert set(states(db).values()) == {"ready"}
    # a late instance of a released study waits for its own quiet period; the others are untouched
    receive(db, "1.3", now=200.0)
    assert states(db) == {"1.1": "ready", "1.2": "ready", "1.3": "received"}
    assert len(db.studies.release_due(fixed(5.0), now=202.0)) == 0
    assert len(db.studies.release_due(fixed(5.0), now=205.0)) == 1
    assert states(db)["1.3"] == "ready"


def test_deliveries_retry_then_fail_then_requeue(database):
    db = StateDB(database)
    iid, _ = receive(db, "1.1", now=0.0)
    db.studies.release_due(fixed(1.0), now=5.0)
    assert [r.sop_uid for r in db.ready_instances(limit=64)] == ["1.1"]  # what the translator asks
    db.mark_translated(iid, [NewDelivery("pacs", "output", "9.9", "/out/9.9.dcm"),
                             NewDelivery("outbox", "output", "9.9", "/out/9.9.dcm")], now=10.0)
    assert db.ready_instances(limit=64) == []
    due = db.deliveries.due(now=10.0)
    assert {d.destination for d in due} == {"pacs", "outbox"}
    pacs = next(d for d in due if d.destination == "pacs")
    outbox = next(d for d in due if d.destination == "outbox")
    assert db.deliveries.record_results([(outbox, True, None), (pacs, False, "refused")], 3, lambda a: 7.0,
                                        now=10.0) == (1, 1, 0)
    assert states(db)["1.1"] == "translated"  # one delivery still pending
    assert db.deliveries.due(now=16.9) == []  # back-off
    (pacs,) = db.deliveries.due(now=17.0)
    db.deliveries.record_results([(pacs, False, "refused")], 3, lambda a: 7.0, now=17.0)
    (pacs,) = db.deliveries.due(now=24.0)
    assert pacs.attempts == 2
    assert db.deliveries.record_results([(pacs, False, "refused")], 3, lambda a: 7.0, now=24.0) == (0, 0, 1)
    assert states(db)["1.1"] == "failed"
    inst, dels = db.counts()
    assert inst["failed"] == 1 and dels == {"pending": 0, "delivered": 1, "failed": 1, "held": 0}
    assert db.retry_failed(now=30.0) == (1, 0)
    assert states(db)["1.1"] == "translated"
    (pacs,) = db.deliveries.due(now=30.0)
    assert pacs.attempts == 0
    db.deliveries.record_results([(pacs, True, None)], 3, lambda a: 7.0, now=30.0)
    assert states(db)["1.1"] == "delivered"


def test_failed_translation_is_requeued_as_ready(database):
    db = StateDB(database)
    iid, _ = receive(db, "1.1", now=0.0)
    db.studies.release_due(fixed(1.0), now=5.0)
    db.mark_not_translated(iid, "failed", "model missing")
    assert db.retry_failed() == (0, 1)
    assert states(db)["1.1"] == "ready"


def test_unmatched_instance_forwards_original(database):
    db = StateDB(database)
    receive(db, "1.1", now=0.0, matched=False, forward=["pacs"])
    assert states(db)["1.1"] == "unmatched"
    (d,) = db.deliveries.due(now=0.0)
    assert (d.destination, d.kind, d.sop_uid) == ("pacs", "original", "1.1")
    assert len(db.studies.release_due(fixed(0.0), now=100.0)) == 0  # unmatched instances join no study


def test_state_survives_reopen_without_clean_close(tmp_path):
    """Committed rows are there after the process dies without closing (simulated: a second connection)."""
    db = StateDB(tmp_path / "state.db")
    receive(db, "1.1", now=0.0)
    other = sqlite3.connect(str(tmp_path / "state.db"))
    assert other.execute("SELECT sop_uid, state FROM instances").fetchall() == [("1.1", "received")]
    other.close()
    db2 = StateDB(tmp_path / "state.db")
    assert states(db2) == {"1.1": "received"}


def test_finished_instances_are_listed_for_purge_once(database):
    db = StateDB(database)
    iid, _ = receive(db, "1.1", now=0.0)
    kept, _ = receive(db, "1.2", now=0.0, matched=False)  # unmatched, not forwarded: kept on purpose
    fwd, _ = receive(db, "1.3", now=0.0, matched=False, forward=["pacs"])
    db.studies.release_due(fixed(1.0), now=5.0)
    db.mark_translated(iid, [NewDelivery("pacs", "output", "9.9", "/out/9.9.dcm")], now=6.0)
    assert db.sources.finished_unpurged() == []  # nothing delivered yet
    for d in db.deliveries.due(now=6.0):
        db.deliveries.record_results([(d, True, None)], 3, lambda a: 1.0, now=6.0)
    assert sorted(i for i, _ in db.sources.finished_unpurged()) == [iid, fwd]
    db.sources.mark_purged([iid, fwd])
    assert db.sources.finished_unpurged() == []
    assert states(db) == {"1.1": "delivered", "1.2": "unmatched", "1.3": "unmatched"}


def test_spool_sweep_removes_only_stale_partial_files(tmp_path):
    import time

    from dicom_node.spool import Spool

    spool = Spool(tmp_path / "spool").open()
    stale, fresh = spool.tmp / "stale.dcm", spool.tmp / "fresh.dcm"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"in progress")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    assert spool.sweep_tmp(max_age=600) == 1
    assert not stale.exists() and fresh.exists()


def test_old_finished_rows_are_forgotten(database):
    db = StateDB(database)
    old_id, _ = receive(db, "1.1", study="7.1", now=0.0)
    new_id, _ = receive(db, "1.2", study="7.2", now=0.0)
    db.studies.release_due(fixed(1.0), now=5.0)
    for iid, sop in ((old_id, "9.1"), (new_id, "9.2")):
        db.mark_translated(iid, [NewDelivery("pacs", "output", sop, f"/out/{sop}.dcm")], now=6.0)
    (d_old, d_new) = db.deliveries.due(now=6.0)
    db.deliveries.record_results([(d_old, True, None)], 3, lambda a: 1.0, now=10.0)
    db.deliveries.record_results([(d_new, True, None)], 3, lambda a: 1.0, now=1000.0)
    db.sources.mark_purged([old_id])  # only purged rows may go (their files are gone)
    assert db.forget_older_than(500.0, now=1100.0) == 1
    assert states(db) == {"1.2": "delivered"}
    assert db.database.query("SELECT COUNT(*) FROM deliveries")[0][0] == 1
    assert receive(db, "1.1", study="7.1", now=1200.0)[1] is True  # forgotten: new again


def test_max_wait_proceeds_or_discards_a_study_that_never_pauses(database):
    """A sender that never pauses for the quiet period: after max_wait_seconds (from the study's
    first instance) what arrived is translated (proceed) or dropped (discard); later instances
    open a new round with a fresh max_wait, translated as a follow-up."""
    db = StateDB(database)
    for t in range(0, 12, 2):  # every 2 s, quiet period 5 s: never quiet
        receive(db, f"1.{t}", now=100.0 + t)
    assert db.studies.next_deadline(fixed(5.0, 8.0)) == 108.0  # first instance + max_wait, before quiet
    assert db.studies.release_due(fixed(5.0, 8.0), now=107.9) == []
    assert db.studies.release_due(fixed(5.0, 8.0), now=108.0) == [("kim", "1.2.3", "proceed")]
    assert set(states(db).values()) == {"ready"}
    receive(db, "1.20", now=120.0)  # a follow-up: its own round, max_wait counted from now
    assert db.studies.next_deadline(fixed(5.0, 8.0)) == 125.0
    assert db.studies.release_due(fixed(5.0, 8.0), now=125.0) == [("kim", "1.2.3", "quiet")]
    receive(db, "2.1", "2.9", now=200.0)
    receive(db, "2.2", "2.9", now=204.0)
    assert db.studies.release_due(fixed(5.0, 8.0, "discard"), now=208.0) == [("kim", "2.9", "discard")]
    assert states(db)["2.1"] == states(db)["2.2"] == "discarded"
    db.close()


def test_rows_naming_their_route_by_position_are_migrated(tmp_path):
    """A database from before route names (INTEGER route positions) gets the names of the
    routes at those positions; queued work then follows the name, wherever the route moves."""
    path = tmp_path / "state.db"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE instances (id INTEGER PRIMARY KEY, called_ae TEXT NOT NULL, calling_ae TEXT NOT NULL,
            sop_uid TEXT NOT NULL, sop_class TEXT NOT NULL, study_uid TEXT NOT NULL, series_uid TEXT NOT NULL,
            route INTEGER, path TEXT NOT NULL, size INTEGER NOT NULL, state TEXT NOT NULL, received_at REAL NOT NULL,
            updated_at REAL NOT NULL, error TEXT, UNIQUE (called_ae, sop_uid));
        CREATE TABLE studies (id INTEGER PRIMARY KEY, called_ae TEXT NOT NULL, route INTEGER NOT NULL,
            study_uid TEXT NOT NULL, last_received_at REAL NOT NULL, state TEXT NOT NULL,
            UNIQUE (called_ae, route, study_uid));
        INSERT INTO instances VALUES (1, 'KIM', 'CR1', '1.1', '1.2.840.10008.5.1.4.1.1.1', '1.2.3', '1.2.3.4', 1,
            '/spool/1.1.dcm', 10, 'received', 100.0, 100.0, NULL);
        INSERT INTO studies VALUES (1, 'KIM', 1, '1.2.3', 100.0, 'pending');
    """)
    old.commit()
    old.close()
    db = StateDB(path)
    assert db.name_routes(["lee-soft", "kim-sharp"]) == 2
    assert [r.route for r in db.instances()] == ["kim-sharp"]
    assert db.studies.release_due(fixed(5.0), now=106.0) == [("kim-sharp", "1.2.3", "quiet")]
    assert db.name_routes(["kim-sharp"]) == 0  # once only
    db.close()


def test_storage_database_is_checked_before_serving(tmp_path, postgres_server):
    """storage.database: a URL that is not PostgreSQL, or a server that does not answer, is a
    config problem; a reachable one is the node's state database."""
    from dicom_node.config import ConfigError, parse_config
    from tests.nodeproc import free_port, node_config

    model = tmp_path / "m.safetensors"
    from dicom_node.engine import new_style_model, save_style_model

    save_style_model(new_style_model(ngf=4, n_blocks=1, residual=True, seed=0), model, name="m")
    raw = node_config(tmp_path, port=11112, model_path=model,
                      destinations={"out": {"type": "folder", "path": str(tmp_path / "out")}},
                      routes=[{"called_ae": "A", "model": "tiny", "destinations": ["out"]}])
    for url, problem in (("mysql://x@y/z", "storage.database: must be a postgresql://"),
                         (f"postgresql://postgres@127.0.0.1:{free_port()}/none", "storage.database: cannot connect")):
        raw["storage"]["database"] = url
        with pytest.raises(ConfigError) as err:
            parse_config(raw, base_dir=tmp_path)
        assert problem in str(err.value), str(err.value)
    raw["storage"]["database"] = url = postgres_server.new_database()
    assert parse_config(raw, base_dir=tmp_path).storage.database == url


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # no worker may die
def test_postgresql_stopped_during_a_study_fails_stores_then_the_node_recovers(tmp_path, tiny_model_path):
    """While the state database is down every C-STORE gets a failure status (never Success);
    when it is back the node carries on by itself, and everything acknowledged arrives."""
    import tempfile

    from dicom_node.config import parse_config
    from dicom_node.node import Node
    from tests.nodeproc import Receiver, free_port, node_config, send, wait_for
    from tests.postgres import PostgresServer
    from tests.test_node import study

    root = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
    server = PostgresServer(root).start()  # a server of its own: this test stops it
    try:
        with Receiver("PACS") as pacs:
            raw = node_config(tmp_path, port=free_port(), model_path=tiny_model_path, stable=0.3,
                              destinations={"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                                                     "port": pacs.port}},
                              routes=[{"called_ae": "DR_KIM", "model": "tiny", "destinations": ["pacs"]}])
            raw["storage"]["database"] = server.new_database()
            with Node(parse_config(raw, base_dir=tmp_path)) as node:
                before, during, after = study(2), study(2), study(2)
                assert send(node.port, before, called="DR_KIM") == [0, 0]
                server.stop()
                assert send(node.port, during, called="DR_KIM") == [0xA700, 0xA700]  # nothing acknowledged
                server.start_again()
                assert wait_for(lambda: send(node.port, after[:1], called="DR_KIM") == [0], 30)
                assert send(node.port, after[1:], called="DR_KIM") == [0]
                acknowledged = {str(ds.SOPInstanceUID) for ds in before + after}
                assert wait_for(lambda: {str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
                                         for ds in pacs.received} == acknowledged, 60), len(pacs.received)
    finally:
        server.stop()
        import shutil

        shutil.rmtree(root, ignore_errors=True)

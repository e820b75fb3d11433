"""Leases and nodes on one state database (dicom_node.cluster), on SQLite and a real PostgreSQL.

Each "node" here is its own StateDB connection registered under its own id, as separate
processes are in production (tests/test_scale_out.py runs them as processes).
"""
from __future__ import annotations

import threading

import pytest

from dicom_node.cluster import LeaseLost
from dicom_node.state import NewDelivery, StateDB
from tests.postgres import postgres_server  # noqa: F401 - fixture
from tests.test_state import database, fixed, receive  # noqa: F401 - fixture

LEASE = 30.0
T = 1000.0  # the tests' clock


def node(target, name: str, *, exclusive: bool = False, now: float = T) -> StateDB:
    db = StateDB(target)
    db.cluster.lease_seconds = LEASE
    db.cluster.register_node(node_id=f"{name}.1", name=name, role="worker", exclusive=exclusive, now=now)
    return db


def ready(db: StateDB, n: int, route: str = "kim") -> list[int]:
    """``n`` ready instances (one study on ``route``); their ids."""
    ids = [db.record_received(called_ae="KIM", calling_ae="CR1", sop_uid=f"1.{route}.{i}",
                              sop_class="1.2.840.10008.5.1.4.1.1.1", study_uid=f"2.{route}", series_uid="3",
                              route=route, matched=True, path=f"/spool/{route}{i}.dcm", size=1, now=T - 100)[0]
           for i in range(n)]
    db.studies.release_due(fixed(1.0), now=T - 50)
    return ids


def test_two_nodes_claim_different_instances_and_a_dead_nodes_lease_passes_on(database):
    a, b = node(database, "a"), node(database, "b")
    ids = ready(a, 3)
    first = a.claim_ready(now=T)
    second = b.claim_ready(now=T)
    assert {first.id, second.id} < set(ids) and first.id != second.id
    third = a.claim_ready(now=T)
    assert third.id not in (first.id, second.id)
    assert b.claim_ready(now=T) is None  # everything is held
    # a stops renewing (it died): its items are free after the lease, not before
    assert b.claim_ready(now=T + LEASE - 1) is None
    taken = b.claim_ready(now=T + LEASE + 1)
    assert taken.id in (first.id, third.id)
    # a comes back (it was cut off): its result is refused, the row is b's
    with pytest.raises(LeaseLost):
        a.mark_translated(taken.id, [NewDelivery("pacs", "output", "9.1", "/out/9.1.dcm")], now=T + LEASE + 2)
    assert {r.id: r.state for r in a.instances()}[taken.id] == "ready"
    assert a.counts()[1]["pending"] == 0  # nothing of a's result was kept
    b.mark_translated(taken.id, [NewDelivery("pacs", "output", "9.1", "/out/9.1.dcm")], now=T + LEASE + 2)
    assert {r.id: r.state for r in a.instances()}[taken.id] == "translated"
    a.close(), b.close()


def test_heartbeat_renews_only_what_is_in_hand_and_a_clean_stop_gives_everything_back(database):
    a, b = node(database, "a"), node(database, "b")
    ready(a, 2)
    one = a.claim_ready(now=T)
    two = a.claim_ready(now=T)
    a.cluster.release_claims("instances", [two.id])  # a gave it up (an error): free at once
    assert b.claim_ready(now=T).id == two.id
    assert a.cluster.heartbeat(["tiny"], now=T + 20) == 1
    assert b.claim_ready(now=T + LEASE + 1).id == two.id  # b did not beat: its own claim ran out
    assert b.claim_ready(now=T + LEASE + 1) is None  # a's was renewed at T+20: held until T+50
    listed = {n["name"]: n for n in b.cluster.nodes(now=T + 21)}
    assert listed["a"]["state"] == "up" and listed["a"]["holds"]["instances"] == 1
    assert listed["a"]["models"] == ["tiny"] and listed["b"]["holds"]["instances"] == 1
    assert {n["name"]: n["state"] for n in b.cluster.nodes(now=T + 20 + LEASE + 1)}["a"] == "late"
    a.cluster.node_stopped(now=T + 22)
    assert b.claim_ready(now=T + 23).id == one.id
    assert {n["name"]: n["state"] for n in b.cluster.nodes(now=T + 24)}["a"] == "stopped"
    a.close(), b.close()


def test_a_restarted_node_takes_back_its_own_claims_at_once(database):
    a = node(database, "a")
    ready(a, 1)
    assert a.claim_ready(now=T) is not None
    a.close()  # kill -9: the lease stays in the row
    again = StateDB(database)
    again.cluster.lease_seconds = LEASE
    # same name (its spool lock proves the old process is gone): no need to wait for the lease
    assert again.cluster.register_node(node_id="a.2", name="a", role="all", exclusive=False, now=T + 1) == 1
    assert again.claim_ready(now=T + 1) is not None
    other = node(database, "solo", exclusive=True, now=T + 2)  # the only node (SQLite): frees every lease
    assert other.claim_ready(now=T + 2) is not None
    again.close(), other.close()


def test_a_worker_takes_the_routes_of_its_loaded_models_first(database):
    a = node(database, "a")
    old = ready(a, 2, route="soft")
    new = ready(a, 2, route="sharp")
    assert a.claim_ready(prefer=["sharp"], now=T).id == new[0]
    assert a.claim_ready(now=T).id == old[0]  # no preference: oldest first
    assert a.claim_ready(prefer=["sharp"], now=T).id == new[1]
    assert a.claim_ready(prefer=["sharp"], now=T).id == old[1]  # none of those left: any route
    a.close()


def test_deliveries_and_notifications_are_claimed_once_and_results_are_fenced(database):
    a, b = node(database, "a"), node(database, "b")
    iid = ready(a, 1)[0]
    a.claim_ready(now=T)
    a.mark_translated(iid, [NewDelivery(d, "output", "9.1", "/out/9.1.dcm") for d in ("pacs", "viewer")], now=T)
    mine = a.deliveries.claim(now=T + 1)
    assert len(mine) == 2 and b.deliveries.claim(now=T + 1) == []
    stolen = b.deliveries.claim(now=T + 2 + LEASE)  # a went silent
    assert len(stolen) == 2
    expired = T + 3 + LEASE
    assert a.deliveries.record_results([(r, True, None) for r in mine], 5, lambda n: 1.0, now=expired) == (0, 0, 0)
    assert b.deliveries.record_results([(r, True, None) for r in stolen], 5, lambda n: 1.0, now=expired) == (2, 0, 0)
    assert {r.id: r.state for r in a.instances()}[iid] == "delivered"
    assert b.counters.values()["deliveries"] == [({"destination": "pacs", "outcome": "delivered"}, 1),
                                                 ({"destination": "viewer", "outcome": "delivered"}, 1)]
    with a.database.tx() as c:
        c.execute("INSERT INTO notifications (webhook, event, body, state, next_attempt_at, created_at, updated_at) "
                  "VALUES ('hook', 'study.delivered', '{}', 'pending', ?, ?, ?)", (T, T, T))
    claimed = a.outbox.claim(now=T + 1)
    assert len(claimed) == 1 and b.outbox.claim(now=T + 1) == []
    later = b.outbox.claim(now=T + 2 + LEASE)
    assert a.outbox.record(claimed[0][0], "hook", True, None, 1, 5, 1.0, now=T + 3 + LEASE) == "taken"
    assert b.outbox.record(later[0][0], "hook", True, None, 1, 5, 1.0, now=T + 3 + LEASE) == "sent"
    a.close(), b.close()


def test_concurrent_claims_never_hand_one_instance_to_two_nodes(database):
    """Two connections claiming as fast as they can (FOR UPDATE SKIP LOCKED on PostgreSQL)."""
    setup = node(database, "setup")
    ids = ready(setup, 120)
    setup.close()
    got: dict[str, list[int]] = {"a": [], "b": []}
    both = threading.Barrier(2)

    def drain(name: str) -> None:
        db = node(database, name)
        both.wait(30)
        while (row := db.claim_ready()) is not None:
            got[name].append(row.id)
        db.close()

    threads = [threading.Thread(target=drain, args=(n,)) for n in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(got["a"] + got["b"]) == sorted(ids)  # each exactly once
    if isinstance(database, str):  # PostgreSQL: row locks, both get work (SQLite's one writer may starve one)
        assert got["a"] and got["b"], "both nodes got work"


def test_roles_need_a_shared_database_and_node_names_are_checked(tmp_path, tiny_model_path):
    import subprocess
    import sys

    from dicom_node.config import ConfigError, parse_config
    from tests.nodeproc import free_port, node_config, write_config

    raw = node_config(tmp_path, port=free_port(), model_path=tiny_model_path, destinations={
        "out": {"type": "folder", "path": str(tmp_path / "out")}}, routes=[{"called_ae": "KIM", "model": "tiny",
                                                                          "destinations": ["out"]}])
    raw["storage"].pop("database", None)
    path = write_config(tmp_path / "node.yaml", raw)
    done = subprocess.run([sys.executable, "-m", "dicom_node", "serve", "--config", str(path), "--role", "worker"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "needs a shared state database" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    raw["node"]["name"] = "gpu 1/../x"
    with pytest.raises(ConfigError) as err:
        parse_config(raw, base_dir=tmp_path)
    assert "node.name" in str(err.value)
    raw["node"]["name"], raw["storage"]["lease_seconds"] = "gpu-1", 0.5
    with pytest.raises(ConfigError) as err:
        parse_config(raw, base_dir=tmp_path)
    assert "storage.lease_seconds" in str(err.value)


def test_two_nodes_of_one_name_or_a_sqlite_node_cannot_share_a_spool(tmp_path):
    from dicom_node.errors import UserError
    from dicom_node.spool import Spool

    a = Spool(tmp_path / "spool", node="gpu-1")
    a.lock()
    Spool(tmp_path / "spool", node="gpu-2").lock()  # another name: fine
    with pytest.raises(UserError, match="named 'gpu-1'"):
        Spool(tmp_path / "spool", node="gpu-1").lock()
    with pytest.raises(UserError, match="SQLite|in use"):
        Spool(tmp_path / "spool").lock()
    a.unlock()
    assert a.tmp == tmp_path.resolve() / "spool" / "nodes" / "gpu-1" / "tmp"


def test_two_receivers_storing_one_instance_at_the_same_moment_make_it_a_duplicate(database):
    """The second receiver's insert meets the first one's unique key: not an error, a duplicate."""
    a, b = node(database, "a"), node(database, "b")
    result: list = []
    with a.database.tx() as c:  # a's C-STORE is half-way: its row is written, not yet committed
        a_id = c.insert_id("INSERT INTO instances (called_ae, calling_ae, sop_uid, sop_class, study_uid, series_uid, "
                           "route, path, size, state, received_at, updated_at) VALUES "
                           "('KIM','CR1','1.9','1.2','2.9','3','kim','/spool/x.dcm',1,'received',?,?)", (T, T))
        t = threading.Thread(target=lambda: result.append(receive(b, "1.9", "2.9", now=T)))
        t.start()
        t.join(0.5)  # b waits for a's transaction (the row lock, or SQLite's write lock)
    t.join(30)
    assert result == [(a_id, False)]
    a.close(), b.close()


def test_opening_the_schema_beside_a_busy_node_neither_waits_nor_deadlocks(database):
    """A node starting, or ``dicom-node status``, while another node is inside a write: on
    PostgreSQL the schema script took share locks on every table (CREATE INDEX IF NOT EXISTS
    locks its table even when the index exists) and deadlocked with the writer (CI, stop 19)."""
    a = node(database, "a")
    ready(a, 1)
    with a.database.tx() as c:  # a is half-way through a write on several tables
        c.execute("UPDATE instances SET updated_at=?", (T,))
        c.execute("UPDATE studies SET last_received_at=?", (T,))
        opened: list = []
        t = threading.Thread(target=lambda: opened.append(StateDB(database, timeout=2.0)))
        t.start()
        t.join(10)
        assert opened, "opening the schema waited for a running node's transaction"
        c.execute("UPDATE deliveries SET updated_at=?", (T,))  # a goes on writing: no cycle
    opened[0].close(), a.close()

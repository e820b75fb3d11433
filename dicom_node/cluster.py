"""Several nodes on one state database (``StateDB.cluster``): who is up, and who holds what.

Why leases: with one PostgreSQL database and one shared spool, any node may receive and any
worker may translate or deliver.  A node *claims* the work it starts (a ready instance, a
batch of due deliveries, a notification) by writing its id and a lease end into the row, in
one transaction that skips rows other nodes hold (``FOR UPDATE SKIP LOCKED`` on PostgreSQL;
SQLite's write lock serialises claims anyway).  Its heartbeat renews every lease it holds;
a node that dies stops renewing, and after ``storage.lease_seconds`` its work is free for the
others.  A result is written only while the lease is still the writer's (``LeaseLost``
otherwise): a node that was cut off and comes back never overwrites the work of the node
that took over.  Output UIDs are deterministic, so the rare double send of a taken-over item
is the same Secondary Capture at the PACS.

The ``nodes`` table has one row per node start: name, role, host, pid, heartbeat, the
models it has loaded; ``dicom-node status`` and the console show it.  Clocks of the nodes
must agree (NTP): a lease ends by the claiming node's clock.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

from dicom_node.database import Connection, Database, first_line
from dicom_node.loops import Loop

if TYPE_CHECKING:
    from dicom_node.config import NodeConfig

__all__ = ["NODES_SCHEMA", "LEASED_TABLES", "LEASE_COLUMNS", "ROLES", "LeaseLost", "Cluster", "Heartbeat", "node_name",
           "new_node_id"]

log = logging.getLogger("dicom_node.cluster")

ROLES = ("all", "receive", "worker")  # serve --role: receive = listener only, worker = no listener
LEASED_TABLES = ("instances", "deliveries", "notifications")
LEASE_COLUMNS = (("lease_owner", "TEXT"), ("lease_until", "REAL"))
NODES_KEPT_SECONDS = 86400.0  # status lists nodes seen within a day (a node that died: worth seeing)
STOPPED_NODES_KEPT_SECONDS = 3600.0  # ... and a clean stop for an hour (a restart is no news after that)

NODES_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    id           TEXT PRIMARY KEY,           -- name.pid.random: one per start
    name         TEXT NOT NULL,              -- node.name (default: the host name)
    role         TEXT NOT NULL,              -- all | receive | worker
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    started_at   REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    stopped_at   REAL,                       -- a clean stop (NULL: running, or died)
    models       TEXT NOT NULL DEFAULT '[]'  -- JSON list of the models it has loaded
);
CREATE INDEX IF NOT EXISTS nodes_seen ON nodes (heartbeat_at);
"""


class LeaseLost(Exception):
    """The item's lease passed to another node (this one was too slow or cut off): its result is dropped."""


def node_name(config: NodeConfig) -> str:
    """``node.name``, or the host name: what the node's spool lock, temp folder and status row are called."""
    name = config.node.name or socket.gethostname().split(".")[0]
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64] or "node"


def new_node_id(name: str) -> str:
    return f"{name}.{os.getpid()}.{secrets.token_hex(2)}"


class Cluster:
    """This process's membership and leases on the state database.

    ``owner`` is this process's node id once it registered (a CLI command has none: it claims
    nothing, and its writes are not fenced).  The heartbeat renews only the leases of items
    this process still has in hand (``_held``): an item whose worker failed half-way, even
    with the database away, is dropped from there and its lease runs out, so it is never
    stuck behind a live node.
    """

    def __init__(self, database: Database, lease_seconds: float = 30.0) -> None:
        self.database = database
        self.lease_seconds = lease_seconds
        self.owner: str | None = None
        self._held: dict[str, set[int]] = {t: set() for t in LEASED_TABLES}
        self._held_lock = threading.Lock()

    def let_go(self, table: str, ids: Iterable[int]) -> list[int]:
        """Forget that these items are in hand (finished, or given up); those that were."""
        with self._held_lock:
            was = [i for i in ids if i in self._held[table]]
            self._held[table].difference_update(was)
        return was

    # -- membership ----------------------------------------------------------------------
    def register_node(self, *, node_id: str, name: str, role: str, exclusive: bool,
                      now: float | None = None) -> int:
        """This process is node ``node_id`` from now on; returns how many leases it freed.

        Freed: leases of earlier starts of the same name (that process is gone: the spool lock
        of the name is ours), and with ``exclusive`` (SQLite: the only node) every other lease.
        """
        now = time.time() if now is None else now
        self.owner = node_id
        freed = 0
        params: tuple[str, ...] = ()
        with self.database.tx() as conn:
            if exclusive:
                gone, params = "lease_owner IS NOT NULL", ()
            else:
                gone, params = "lease_owner IN (SELECT id FROM nodes WHERE name=?)", (name,)
            for table in LEASED_TABLES:
                freed += conn.execute(f"UPDATE {table} SET lease_owner=NULL, lease_until=NULL WHERE {gone}",
                                   params).rowcount
            conn.execute("UPDATE nodes SET stopped_at=? WHERE stopped_at IS NULL AND name=?", (now, name))
            conn.execute("INSERT INTO nodes (id, name, role, host, pid, started_at, heartbeat_at) VALUES (?,?,?,?,?,?,?)",
                      (node_id, name, role, socket.gethostname(), os.getpid(), now, now))
        return freed

    def heartbeat(self, models: Iterable[str] = (), now: float | None = None) -> int:
        """Say this node is alive and renew the leases of the items in hand; returns how many."""
        now = time.time() if now is None else now
        with self._held_lock:
            in_hand = {t: sorted(ids) for t, ids in self._held.items()}
        renewed = 0
        with self.database.tx() as conn:
            conn.execute("UPDATE nodes SET heartbeat_at=?, models=? WHERE id=?",
                      (now, json.dumps(sorted(models)), self.owner))
            for table, ids in in_hand.items():
                for start in range(0, len(ids), 500):
                    chunk = ids[start:start + 500]
                    renewed += conn.execute(f"UPDATE {table} SET lease_until=? WHERE lease_owner=? AND id IN "
                                         f"({','.join('?' * len(chunk))})",
                                         (now + self.lease_seconds, self.owner, *chunk)).rowcount
        return renewed

    def node_stopped(self, now: float | None = None, forget: bool = False) -> None:
        """A clean stop: give back every lease at once (the others need not wait for it to end).

        ``forget``: a start that failed half-way (it never served): its row goes, so no ghost
        "stopped" node is listed.
        """
        now = time.time() if now is None else now
        with self.database.tx() as conn:
            for table in LEASED_TABLES:
                conn.execute(f"UPDATE {table} SET lease_owner=NULL, lease_until=NULL WHERE lease_owner=?", (self.owner,))
            if forget:
                conn.execute("DELETE FROM nodes WHERE id=?", (self.owner,))
            else:
                conn.execute("UPDATE nodes SET stopped_at=?, heartbeat_at=? WHERE id=?", (now, now, self.owner))
        with self._held_lock:
            for ids in self._held.values():
                ids.clear()

    def nodes(self, now: float | None = None) -> list[dict[str, Any]]:
        """Every node seen within a day, less those stopped cleanly over an hour ago: its row,
        ``state`` (up | late | stopped) and what it holds."""
        now = time.time() if now is None else now
        rows = self.database.query("SELECT id, name, role, host, pid, started_at, heartbeat_at, stopped_at, models "
                                   "FROM nodes "
                                   "WHERE heartbeat_at >= ? AND (stopped_at IS NULL OR stopped_at >= ?) "
                                   "ORDER BY name, started_at DESC",
                                   (now - NODES_KEPT_SECONDS, now - STOPPED_NODES_KEPT_SECONDS))
        held: dict[str, dict[str, int]] = {}
        for table in LEASED_TABLES:
            for owner, n in self.database.query(f"SELECT lease_owner, COUNT(*) FROM {table} "
                                                "WHERE lease_owner IS NOT NULL GROUP BY lease_owner"):
                held.setdefault(str(owner), {})[table] = int(n)
        out = []
        for nid, name, role, host, pid, started, beat, stopped, models in rows:
            state = "stopped" if stopped is not None else ("up" if now - beat <= self.lease_seconds else "late")
            out.append({"id": nid, "name": name, "role": role, "host": host, "pid": int(pid), "state": state,
                        "started_at": float(started), "heartbeat_at": float(beat), "models": json.loads(models),
                        "holds": {t: held.get(str(nid), {}).get(t, 0) for t in LEASED_TABLES}})
        return out

    # -- leases --------------------------------------------------------------------------
    def claim(self, conn: Connection, table: str, where: str, params: Iterable[Any], order: str, limit: int,
              now: float) -> list[int]:
        """Lease up to ``limit`` free rows of ``table`` matching ``where`` to this node, inside the
        caller's transaction; their ids.  Claims of a transaction that does not commit are let go
        at once: never kept in hand, or the heartbeat would go on renewing them."""
        sql = (f"SELECT id FROM {table} WHERE {where} AND (lease_until IS NULL OR lease_until < ?) "
               f"ORDER BY {order} LIMIT ?")
        if conn.dialect == "postgresql":
            sql += " FOR UPDATE SKIP LOCKED"  # another node's claim in progress: take the next rows
        ids = [int(r[0]) for r in conn.execute(sql, (*params, now, int(limit))).fetchall()]
        if ids and self.owner is not None:
            conn.execute(f"UPDATE {table} SET lease_owner=?, lease_until=? WHERE id IN ({','.join('?' * len(ids))})",
                      (self.owner, now + self.lease_seconds, *ids))
            with self._held_lock:
                new = [i for i in ids if i not in self._held[table]]
                self._held[table].update(new)
            self.database.on_abort(lambda: self.let_go(table, new))
        return ids

    def fence(self, column: str = "lease_owner") -> tuple[str, tuple[str, ...]]:
        """The condition that a row is still this node's (nothing for an unregistered process)."""
        return ("", ()) if self.owner is None else (f" AND {column}=?", (self.owner,))

    def release_claims(self, table: str, ids: Iterable[int]) -> None:
        """Give back the leases of claimed items not finished (a stop, an error); never raises.

        Items already finished are skipped.  When the database is away the leases simply run
        out (they are no longer renewed).
        """
        assert table in LEASED_TABLES
        ids = self.let_go(table, [int(i) for i in ids])
        if not ids or self.owner is None:
            return
        try:
            with self.database.tx() as conn:
                conn.execute(f"UPDATE {table} SET lease_owner=NULL, lease_until=NULL WHERE lease_owner=? "
                          f"AND id IN ({','.join('?' * len(ids))})", (self.owner, *ids))
        except Exception as exc:  # noqa: BLE001 - see above
            log.warning("could not give back %d claimed %s (%s): they pass on after %gs", len(ids), table,
                        exc.__class__.__name__, self.lease_seconds)

    def forget_nodes(self, conn: Connection, cutoff: float) -> None:
        conn.execute("DELETE FROM nodes WHERE heartbeat_at < ? AND id != ?", (cutoff, self.owner or ""))


class Heartbeat(Loop):
    """Every third of the lease: the node's heartbeat, which renews its leases.

    A database outage is logged once, when it starts and when it ends; the leases then may
    have passed to other nodes, whose results win (``LeaseLost`` for this node's).
    """

    WAIT_FIRST = True
    logger = log

    def __init__(self, cluster: Cluster, stop: threading.Event, models: Callable[[], Iterable[str]]) -> None:
        super().__init__("heartbeat", stop)
        self.cluster, self.models = cluster, models
        self.interval = self.error_pause = max(0.2, cluster.lease_seconds / 3.0)

    def idle_seconds(self) -> float:
        return self.interval

    def step(self) -> bool:
        self.cluster.heartbeat(self.models())
        return False

    def failed(self, exc: Exception) -> None:
        if not self.failing:  # the database is away: the next beat tries again
            log.error("heartbeat: %s (leases not renewed; others take over after %gs)", first_line(exc),
                      self.cluster.lease_seconds)

    def recovered(self) -> None:
        log.info("heartbeat: the state database answers again")

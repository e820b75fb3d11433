"""The node's durable state machine in SQLite (WAL, synchronous=FULL).

Why SQLite: the node must never lose an acknowledged instance and must resume every
unfinished item after a crash; one small transactional file next to the spool gives that
without a broker.  The C-STORE handler commits the instance row *before* it answers
success; the worker moves rows forward one committed transaction at a time, so after
kill -9 every row is in a state from which the worker simply continues.

Instance states (one row per (called AE, SOP Instance UID)):

    received    acknowledged, its study is still receiving (quiet-period timer running)
    ready       its study has been quiet for study_stable_seconds: waiting for the model
    translated  outputs are in the spool; deliveries (one row per destination and file)
                are pending
    delivered   every delivery succeeded                                  (final)
    failed      translation failed, or a delivery gave up after max_attempts (``retry``)
    unmatched   no route condition held: kept, not translated; its original may be
                forwarded (deliveries rows)                                (final)
    unsupported the engine cannot translate it (e.g. SR, colour): kept, original may be
                forwarded                                                  (final)
    withheld    translated, but the fidelity guard flagged the output and its route says
                ``withhold``: the output waits in the spool for an operator
                (``dicom-node release`` -> translated, ``dicom-node discard`` -> discarded)
    discarded   an operator dropped the withheld output, or the study waited longer than
                its route's ``max_wait_seconds`` with ``on_max_wait: discard``  (final)

Delivery states: pending -> delivered | failed (after ``max_attempts``); held (a withheld
output's delivery, until released: -> pending; or discarded: removed).

Every output also gets a row in ``outputs``, the audit trail (source SOP UID, model and its
weight digest, output SOP UID, fidelity verdict with reasons and scores, what happened to it,
when).  Audit rows are kept when old instance rows are forgotten.

Study timers live in the ``studies`` table (per route name and Study Instance UID), so a
restart does not lose or prematurely release a pending study.  Rows name their route by its
``name`` (never by its position in the config), so editing or reordering routes never
misroutes queued work; databases from before route names are migrated at start
(:meth:`StateDB.name_routes`).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from dicom_node.audit_trail import AuditTrail
from dicom_node.cluster import NODES_SCHEMA, LeaseLost, Membership
from dicom_node.console_queries import ConsoleQueries
from dicom_node.counters import COUNTERS_SCHEMA, CounterStore, bump
from dicom_node.database import Database, is_conflict
from dicom_node.outbox import NOTIFICATIONS_SCHEMA, NotificationOutbox
from dicom_node.operations_log import OPERATIONS_SCHEMA, OperationsLog
from dicom_node.reprocessing import REPROCESS_COLUMNS, SourceKeeping

__all__ = ["StateDB", "InstanceRow", "DeliveryRow", "NewDelivery", "OutputRecord", "INSTANCE_STATES",
           "DELIVERY_STATES"]

# route name -> (study_stable_seconds, max_wait_seconds or None, on_max_wait)
StudyTimers = Callable[[str], "tuple[float, float | None, str]"]

INSTANCE_STATES = ("received", "ready", "translated", "delivered", "failed", "unmatched", "unsupported", "withheld",
                   "discarded")
DELIVERY_STATES = ("pending", "delivered", "failed", "held")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    id          INTEGER PRIMARY KEY,
    called_ae   TEXT NOT NULL,
    calling_ae  TEXT NOT NULL,
    sop_uid     TEXT NOT NULL,
    sop_class   TEXT NOT NULL,
    study_uid   TEXT NOT NULL,
    series_uid  TEXT NOT NULL,
    route       TEXT,                    -- the route's name (databases before names: its position)
    path        TEXT NOT NULL,
    size        INTEGER NOT NULL,
    state       TEXT NOT NULL,
    received_at REAL NOT NULL,
    updated_at  REAL NOT NULL,
    error       TEXT,
    purged      INTEGER NOT NULL DEFAULT 0,  -- 1: its spool files were removed after delivery
    UNIQUE (called_ae, sop_uid)
);
CREATE INDEX IF NOT EXISTS instances_state ON instances (state, id);
CREATE INDEX IF NOT EXISTS instances_study ON instances (called_ae, route, study_uid);
CREATE TABLE IF NOT EXISTS studies (
    id                INTEGER PRIMARY KEY,
    called_ae         TEXT NOT NULL,
    route             TEXT NOT NULL,         -- the route's name
    study_uid         TEXT NOT NULL,
    last_received_at  REAL NOT NULL,
    state             TEXT NOT NULL,         -- pending | released
    first_received_at REAL,                  -- of this round (max_wait_seconds counts from it)
    UNIQUE (called_ae, route, study_uid)
);
CREATE INDEX IF NOT EXISTS studies_state ON studies (state, last_received_at);
CREATE TABLE IF NOT EXISTS deliveries (
    id              INTEGER PRIMARY KEY,
    instance_id     INTEGER NOT NULL REFERENCES instances (id),
    destination     TEXT NOT NULL,
    kind            TEXT NOT NULL,           -- output | original
    sop_uid         TEXT NOT NULL,
    path            TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    updated_at      REAL NOT NULL,
    last_error      TEXT,
    UNIQUE (instance_id, destination, sop_uid)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_claim ON deliveries (state, destination, next_attempt_at, id);
CREATE TABLE IF NOT EXISTS outputs (
    id              INTEGER PRIMARY KEY,
    instance_id     INTEGER NOT NULL,        -- no foreign key: the audit outlives forgotten rows
    called_ae       TEXT NOT NULL,
    study_uid       TEXT NOT NULL,
    source_sop_uid  TEXT NOT NULL,
    output_sop_uid  TEXT NOT NULL,
    model           TEXT NOT NULL,
    model_version   TEXT NOT NULL,
    model_digest    TEXT NOT NULL,           -- sha256 of the weights
    device_uid      TEXT NOT NULL,
    verdict         TEXT NOT NULL,           -- ok | flagged
    reasons         TEXT NOT NULL,           -- JSON list
    scores          TEXT NOT NULL,           -- JSON object
    thresholds      TEXT NOT NULL,           -- JSON object
    action          TEXT NOT NULL,           -- the route's fidelity action
    disposition     TEXT NOT NULL,           -- forwarded | withheld | released | discarded
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    UNIQUE (called_ae, source_sop_uid, output_sop_uid)
);
CREATE INDEX IF NOT EXISTS outputs_study ON outputs (study_uid, created_at);
CREATE INDEX IF NOT EXISTS outputs_time ON outputs (created_at);
CREATE INDEX IF NOT EXISTS outputs_instance ON outputs (instance_id);
CREATE INDEX IF NOT EXISTS deliveries_instance ON deliveries (instance_id);
CREATE INDEX IF NOT EXISTS deliveries_done ON deliveries (state, updated_at);
CREATE INDEX IF NOT EXISTS instances_received ON instances (received_at);
-- What the console shows of a study; the only table with patient data (behind the console's
-- login; never logged).  Forgotten with the study's instances.
CREATE TABLE IF NOT EXISTS study_info (
    study_uid    TEXT PRIMARY KEY,
    patient_name TEXT NOT NULL,
    patient_id   TEXT NOT NULL,
    accession    TEXT NOT NULL,
    study_date   TEXT NOT NULL,
    description  TEXT NOT NULL,
    modality     TEXT NOT NULL
);
""" + COUNTERS_SCHEMA + OPERATIONS_SCHEMA + NOTIFICATIONS_SCHEMA + NODES_SCHEMA

STUDY_INFO_KEYWORDS = {"PatientName": "patient_name", "PatientID": "patient_id", "AccessionNumber": "accession",
                       "StudyDate": "study_date", "StudyDescription": "description", "Modality": "modality"}


@dataclass(frozen=True)
class InstanceRow:
    id: int
    called_ae: str
    calling_ae: str
    sop_uid: str
    sop_class: str
    study_uid: str
    series_uid: str
    route: str | None  # the route's name
    path: str
    size: int
    state: str
    received_at: float
    error: str | None


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    instance_id: int
    destination: str
    kind: str
    sop_uid: str
    path: str
    attempts: int


@dataclass(frozen=True)
class NewDelivery:
    destination: str
    kind: str  # "output" or "original"
    sop_uid: str
    path: str


@dataclass(frozen=True)
class OutputRecord:
    """What the audit trail keeps of one output (``outputs`` table)."""

    source_sop_uid: str
    output_sop_uid: str
    model: str
    model_version: str
    model_digest: str
    device_uid: str
    verdict: str
    reasons: list[str]
    scores: dict
    thresholds: dict
    action: str
    output_version: int = 1  # 2, 3...: re-translated by dicom-node reprocess
    requested_by: str | None = None  # who asked for that reprocess


AUDIT_COLS = ("id", "instance_id", "called_ae", "study_uid", "source_sop_uid", "output_sop_uid", "model",
              "model_version", "model_digest", "device_uid", "verdict", "reasons", "scores", "thresholds", "action",
              "disposition", "created_at", "updated_at", "source_revision", "output_version", "requested_by")

# A resend of an instance with other content (same SOP Instance UID: corrected demographics) is
# processed again: the instance keeps the digest of what it holds and counts its revisions, and
# its audit row says from which revision the output was made.
_REVISION_COLUMNS = (("instances", "content_sha256", "TEXT"), ("instances", "revision", "INTEGER NOT NULL DEFAULT 0"),
                     ("outputs", "source_revision", "INTEGER NOT NULL DEFAULT 0"))

_INSTANCE_COLS = ("id, called_ae, calling_ae, sop_uid, sop_class, study_uid, series_uid, route, path, size, "
                  "state, received_at, error")


class StateDB(AuditTrail, CounterStore, OperationsLog, ConsoleQueries, NotificationOutbox, Membership, SourceKeeping):
    """Thread-safe access to the state database (one connection, one lock).

    Parts in modules of their own: the audit trail and the withheld outputs' release/discard
    (:mod:`dicom_node.audit_trail`), the metrics' counters (:mod:`dicom_node.counters`), the
    association and operator logs (:mod:`dicom_node.operations_log`) and the console's reads
    (:mod:`dicom_node.console_queries`), the webhook outbox (:mod:`dicom_node.notifications`), the
    nodes and their leases (:mod:`dicom_node.cluster`), reprocessing and the spool's clean-up
    (:mod:`dicom_node.reprocessing`).  Each process (the node, the console, a
    CLI command) opens its own connection: SQLite in WAL mode lets readers run beside the writer.
    """

    def __init__(self, path: Path | str, *, timeout: float = 30.0) -> None:
        """``path``: the SQLite file, or a ``postgresql://`` URL (:mod:`dicom_node.database`)."""
        from dicom_node.database import is_postgres_url, open_database

        self.path = path if is_postgres_url(path) else Path(path)
        self._lock = threading.RLock()
        self._init_membership()
        self._conn = open_database(self.path, timeout=timeout)
        with self._lock, self._conn.schema_lock():
            had_counters = self._conn.has_table("counters")
            self._conn.script(_SCHEMA)
            if "purged" not in self._conn.columns("instances"):  # a database from before spool clean-up
                self._conn.script("ALTER TABLE instances ADD COLUMN purged INTEGER NOT NULL DEFAULT 0")
            if "first_received_at" not in self._conn.columns("studies"):  # from before max_wait
                self._conn.script("ALTER TABLE studies ADD COLUMN first_received_at REAL")
            for table, column, ddl in _REVISION_COLUMNS + REPROCESS_COLUMNS:  # from before corrected resends were processed
                if column not in self._conn.columns(table):
                    self._conn.script(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}")
            # Only the few rows whose files are still in the spool: the purge query stays cheap
            # however many delivered instances the table remembers.
            self._conn.script("CREATE INDEX IF NOT EXISTS instances_unpurged ON instances (id) WHERE purged=0")
            self._add_lease_columns()
            for table in ("instances", "deliveries", "notifications"):  # the heartbeat's renewal stays cheap
                self._conn.script(f"CREATE INDEX IF NOT EXISTS {table}_leased ON {table} (lease_owner) "
                                  "WHERE lease_owner IS NOT NULL")
        if not had_counters:
            with self._tx() as c:
                self._seed_counters(c)
        if isinstance(self.path, Path):
            try:
                self.path.chmod(0o600)
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- plumbing ----------------------------------------------------------------------
    class _Tx:
        def __init__(self, db: "StateDB") -> None:
            self.db = db

        def __enter__(self) -> "Database":
            self.db._lock.acquire()
            try:
                self.db._conn.begin()
                with self.db._held_lock:
                    self.held_before = {t: set(ids) for t, ids in self.db._held.items()}
            except BaseException:
                self.db._lock.release()
                raise
            return self.db._conn

        def __exit__(self, exc_type, exc, tb) -> None:
            committed = False
            try:
                if exc_type is None:
                    self.db._conn.commit()
                    committed = True
                else:
                    self.db._conn.rollback()
            finally:
                if not committed:
                    # Claims of a transaction that did not commit (a full disk fails the COMMIT
                    # itself) are not this node's: never keep them in hand, or the heartbeat
                    # would go on renewing them.
                    with self.db._held_lock:
                        added = {t: ids - self.held_before.get(t, set()) for t, ids in self.db._held.items()}
                    for table, ids in added.items():
                        self.db._let_go(table, ids)
                self.db._lock.release()

    def _tx(self) -> "StateDB._Tx":
        """A write transaction: BEGIN (SQLite: IMMEDIATE) ... COMMIT (ROLLBACK on exception)."""
        return StateDB._Tx(self)

    def _query(self, sql: str, params: Iterable = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, tuple(params)).fetchall()

    # -- receiving ---------------------------------------------------------------------
    def find_instance(self, called_ae: str, sop_uid: str) -> InstanceRow | None:
        rows = self._query(f"SELECT {_INSTANCE_COLS} FROM instances WHERE called_ae=? AND sop_uid=?",
                           (called_ae, sop_uid))
        return InstanceRow(*rows[0]) if rows else None

    def record_received(
        self, *, called_ae: str, calling_ae: str, sop_uid: str, sop_class: str, study_uid: str,
        series_uid: str, route: str | None, matched: bool, path: str, size: int,
        forward: Iterable[str] = (), now: float | None = None, study: dict[str, str] | None = None,
        content_sha256: str | None = None,
    ) -> tuple[int, bool]:
        """Record an acknowledged instance; returns (row id, is_new).

        A matched instance joins its study's quiet-period timer; an unmatched one is kept
        (state ``unmatched``) and its original queued for the ``forward`` destinations.
        A duplicate (same called AE + SOP Instance UID) changes nothing except that, while
        its study is still receiving, it restarts the study's quiet period.  ``study``: the
        console's study description (keys of ``STUDY_INFO_KEYWORDS``' values), kept once.
        """
        now = time.time() if now is None else now

        def once() -> tuple[int, bool]:
            with self._tx() as c:
                row = c.execute("SELECT id, state, route FROM instances WHERE called_ae=? AND sop_uid=?",
                                (called_ae, sop_uid)).fetchone()
                if row is not None:
                    if row[1] == "received" and row[2] is not None:
                        c.execute("UPDATE studies SET last_received_at=? WHERE called_ae=? AND route=? "
                                  "AND study_uid=? AND state='pending'", (now, called_ae, row[2], study_uid))
                    return int(row[0]), False
                state = "received" if matched else "unmatched"
                iid = c.insert_id(
                    "INSERT INTO instances (called_ae, calling_ae, sop_uid, sop_class, study_uid, series_uid, "
                    "route, path, size, state, received_at, updated_at, content_sha256) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (called_ae, calling_ae, sop_uid, sop_class, study_uid, series_uid, route, path, size,
                     state, now, now, content_sha256))
                bump(c, "received", called_ae=called_ae)
                if study is not None:
                    info = {col: str(study.get(col) or "")[:200] for col in STUDY_INFO_KEYWORDS.values()}
                    c.execute(f"INSERT OR IGNORE INTO study_info (study_uid, {', '.join(info)}) "
                              f"VALUES (?{',?' * len(info)})", (study_uid, *info.values()))
                if matched:
                    self._join_study(c, called_ae, route, study_uid, now)
                else:
                    self._add_deliveries(c, iid, [NewDelivery(d, "original", sop_uid, path) for d in forward], now)
                return iid, True

        try:
            return once()
        except Exception as exc:
            if not is_conflict(exc):
                raise
            # another receiver stored the same instance at this very moment (two nodes of one
            # site): it is a duplicate now
            return once()

    @staticmethod
    def _join_study(c: Database, called_ae: str, route: str | None, study_uid: str, now: float) -> None:
        """An instance to translate joins its study's quiet period.  A study released before
        (translated) opens a new round: a follow-up, translated into the same output series
        after its own quiet period."""
        c.execute(
            "INSERT INTO studies (called_ae, route, study_uid, last_received_at, state, first_received_at) "
            "VALUES (?,?,?,?, 'pending', ?) ON CONFLICT (called_ae, route, study_uid) "
            "DO UPDATE SET last_received_at=excluded.last_received_at, first_received_at=CASE "
            "WHEN studies.state='pending' THEN COALESCE(studies.first_received_at, studies.last_received_at) "
            "ELSE excluded.first_received_at END, state='pending'",
            (called_ae, route, study_uid, now, now))

    def content_digest(self, instance_id: int) -> str | None:
        """The SHA-256 of the data set an instance holds (None: received before digests were kept)."""
        rows = self._query("SELECT content_sha256 FROM instances WHERE id=?", (int(instance_id),))
        return rows[0][0] if rows else None

    def record_revision(self, instance_id: int, *, calling_ae: str, path: str, size: int, content_sha256: str,
                        forward: Iterable[str] = (), now: float | None = None) -> int:
        """A resend of a known instance whose content differs (corrected demographics, same SOP
        Instance UID): it is processed again from the start; returns its revision number.

        The row goes back to ``received`` (its study gets a new quiet period) with the new file,
        whatever it was doing: a translation of the old content in progress loses its lease
        (its result is dropped, :class:`LeaseLost`), and its deliveries are replaced.  The new output has the same UIDs (they are
        derived from the source UIDs and the model), so the PACS replaces the old one; its audit
        row records the revision.  An unmatched instance forwards the new original again.
        """
        now = time.time() if now is None else now
        with self._tx() as c:
            called_ae, route, study_uid, sop_uid, state = c.execute(
                "SELECT called_ae, route, study_uid, sop_uid, state FROM instances WHERE id=?",
                (instance_id,)).fetchone()
            matched = route is not None and state != "unmatched"
            c.execute("UPDATE instances SET calling_ae=?, path=?, size=?, content_sha256=?, revision=revision+1, "
                      "state=?, error=NULL, purged=0, updated_at=?, lease_owner=NULL, lease_until=NULL WHERE id=?",
                      (calling_ae, path, size, content_sha256, "received" if matched else "unmatched", now,
                       instance_id))
            self._let_go("instances", [instance_id])
            # The old content's deliveries (sent, pending, or in flight: a deliverer's result for a
            # row that is gone is dropped) make way for the new output's, which reuse their keys.
            c.execute("DELETE FROM deliveries WHERE instance_id=?", (instance_id,))
            bump(c, "received", called_ae=called_ae)
            if matched:
                self._join_study(c, called_ae, route, study_uid, now)
            else:
                self._add_deliveries(c, instance_id, [NewDelivery(d, "original", sop_uid, path) for d in forward], now)
            return int(c.execute("SELECT revision FROM instances WHERE id=?", (instance_id,)).fetchone()[0])

    # -- grouping ----------------------------------------------------------------------
    def name_routes(self, names: list[str]) -> int:
        """A database from before route names: rows that name their route by position get the
        name of the route at that position in the config the node starts with."""
        if self._conn.dialect != "sqlite":
            return 0  # PostgreSQL databases were made with route names
        with self._tx() as c:
            n = 0
            for table in ("instances", "studies"):
                for index, name in enumerate(names):
                    n += c.execute(f"UPDATE {table} SET route=? WHERE typeof(route)='integer' AND route=?",
                                   (name, index)).rowcount
        return n

    def _pending_studies(self, c: Database, lock: bool = False) -> list[tuple]:
        """``lock``: PostgreSQL row locks for a release (two workers never release one study twice;
        a study another worker is releasing right now is skipped)."""
        sql = ("SELECT id, called_ae, route, study_uid, last_received_at, "
               "COALESCE(first_received_at, last_received_at) FROM studies WHERE state='pending'")
        return c.execute(sql + (" FOR UPDATE SKIP LOCKED" if lock and c.dialect == "postgresql" else "")).fetchall()

    @staticmethod
    def _due(timers: StudyTimers, route: str, last: float, first: float) -> tuple[float, str]:
        """When a pending study is due, and what happens then (quiet | proceed | discard)."""
        stable, max_wait, on_max_wait = timers(route)
        quiet_at = last + stable
        if max_wait is not None and first + max_wait < quiet_at:
            return first + max_wait, on_max_wait
        return quiet_at, "quiet"

    def release_stable_studies(self, timers: StudyTimers, now: float | None = None) -> list[tuple[str, str, str]]:
        """Release every study that is due: quiet for its route's ``study_stable_seconds``
        (instances -> ``ready``), or waiting for ``max_wait_seconds`` since its first instance
        (``proceed``: -> ``ready``; ``discard``: -> ``discarded``).  ``timers(route name)`` gives
        (stable seconds, max wait seconds or None, on_max_wait).  Returns (route, study, why)."""
        now = time.time() if now is None else now
        done = []
        with self._tx() as c:
            for sid, called_ae, route, study_uid, last, first in self._pending_studies(c, lock=True):
                due, why = self._due(timers, route, last, first)
                if due > now:
                    continue
                state, error = ("discarded", "study discarded: max_wait_seconds reached") if why == "discard" \
                    else ("ready", None)
                c.execute("UPDATE instances SET state=?, error=?, updated_at=? WHERE called_ae=? AND route=? "
                          "AND study_uid=? AND state='received'", (state, error, now, called_ae, route, study_uid))
                c.execute("UPDATE studies SET state='released' WHERE id=?", (sid,))
                done.append((str(route), str(study_uid), why))
        return done

    def next_study_deadline(self, timers: StudyTimers) -> float | None:
        with self._lock:
            due = [self._due(timers, r[2], r[4], r[5])[0] for r in self._pending_studies(self._conn)]
        return min(due) if due else None

    # -- translating -------------------------------------------------------------------
    def ready_instances(self, limit: int) -> list[InstanceRow]:
        """The oldest ``ready`` instances (claimed or not)."""
        rows = self._query(f"SELECT {_INSTANCE_COLS} FROM instances WHERE state='ready' ORDER BY id LIMIT ?",
                           (limit,))
        return [InstanceRow(*r) for r in rows]

    def claim_ready(self, prefer: Iterable[str] | None = None, now: float | None = None) -> InstanceRow | None:
        """Lease the oldest ``ready`` instance no node holds; None when there is none.

        ``prefer``: route names to take first (a worker's routes whose model it has loaded);
        None: any route, oldest first.
        """
        now = time.time() if now is None else now
        prefer = None if prefer is None else list(prefer)
        with self._tx() as c:
            ids: list[int] = []
            if prefer:
                ids = self._claim(c, "instances", f"state='ready' AND route IN ({','.join('?' * len(prefer))})",
                                  prefer, "id", 1, now)
            if not ids:
                ids = self._claim(c, "instances", "state='ready'", (), "id", 1, now)
            if not ids:
                return None
            return InstanceRow(*c.execute(f"SELECT {_INSTANCE_COLS} FROM instances WHERE id=?", (ids[0],)).fetchone())

    def _finish_claim(self, c: Database, instance_id: int, state: str, error: str | None, now: float) -> None:
        """Move a claimed instance on and give back its lease; LeaseLost when it is no longer ours."""
        fence, params = self._fence()
        self._let_go("instances", [instance_id])
        if not c.execute(f"UPDATE instances SET state=?, error=?, updated_at=?, lease_owner=NULL, lease_until=NULL "
                         f"WHERE id=?{fence}", (state, error, now, instance_id, *params)).rowcount:
            raise LeaseLost(f"instance {instance_id} is no longer this node's")

    def mark_translated(self, instance_id: int, deliveries: Iterable[NewDelivery], now: float | None = None, *,
                        output: OutputRecord | None = None, withhold: bool = False,
                        model: str | None = None) -> None:
        """The output is in the spool: queue its deliveries and write its audit row, at once.

        ``withhold``: the output's deliveries are ``held`` and the instance ``withheld`` (the
        originals in ``deliveries`` still go out).  ``model``: the config's name of the model,
        which the counters use (default: the model file's own name).  Raises :class:`LeaseLost`
        (and changes nothing) when this node's claim on the instance passed to another node.
        """
        now = time.time() if now is None else now
        deliveries = list(deliveries)
        with self._tx() as c:
            self._finish_claim(c, instance_id, "withheld" if withhold else "translated", None, now)
            self._add_deliveries(c, instance_id, [d for d in deliveries if not (withhold and d.kind == "output")], now)
            if withhold:
                self._add_deliveries(c, instance_id, [d for d in deliveries if d.kind == "output"], now, state="held")
            if output is not None:
                import json

                called_ae, route, study_uid = self._place(c, instance_id)
                revision = c.execute("SELECT revision FROM instances WHERE id=?", (instance_id,)).fetchone()[0]
                c.execute(
                    "INSERT INTO outputs (instance_id, called_ae, study_uid, source_sop_uid, output_sop_uid, model, "
                    "model_version, model_digest, device_uid, verdict, reasons, scores, thresholds, action, "
                    "disposition, created_at, updated_at, source_revision, output_version, requested_by) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
                    "ON CONFLICT (called_ae, source_sop_uid, output_sop_uid) DO UPDATE SET "
                    "instance_id=excluded.instance_id, verdict=excluded.verdict, reasons=excluded.reasons, "
                    "scores=excluded.scores, thresholds=excluded.thresholds, action=excluded.action, "
                    "disposition=excluded.disposition, updated_at=excluded.updated_at, "
                    "source_revision=excluded.source_revision",
                    (instance_id, called_ae, study_uid, output.source_sop_uid, output.output_sop_uid, output.model,
                     output.model_version, output.model_digest, output.device_uid, output.verdict,
                     json.dumps(output.reasons), json.dumps(output.scores), json.dumps(output.thresholds),
                     output.action, "withheld" if withhold else "forwarded", now, now, int(revision or 0),
                     output.output_version, output.requested_by))
            counted = model or (output.model if output is not None else "unknown")
            bump(c, "translated", model=counted)
            if output is not None and output.verdict == "flagged":
                bump(c, "flagged", model=counted)
                self._notify(c, "output.withheld" if withhold else "output.flagged", {
                    "called_ae": called_ae, "route": route, "study_uid": study_uid, "model": output.model,
                    "model_version": output.model_version, "source_sop_uid": output.source_sop_uid,
                    "output_sop_uid": output.output_sop_uid, "reasons": output.reasons, "action": output.action},
                    study_uid, now)
            self._finish_if_done(c, [instance_id], now)

    def mark_not_translated(self, instance_id: int, state: str, error: str,
                            deliveries: Iterable[NewDelivery] = (), now: float | None = None) -> None:
        """``unsupported`` (kept; original maybe forwarded) or ``failed`` (``retry`` requeues).

        Like :meth:`mark_translated`, raises :class:`LeaseLost` (and changes nothing) when this
        node's claim on the instance passed to another node."""
        assert state in ("unsupported", "failed")
        now = time.time() if now is None else now
        with self._tx() as c:
            self._finish_claim(c, instance_id, state, error[:500], now)
            self._add_deliveries(c, instance_id, deliveries, now)

    @staticmethod
    def _place(c: Database, instance_id: int) -> tuple[str, str | None, str]:
        """(called AE, route name, Study Instance UID) of an instance: what events report."""
        return tuple(c.execute("SELECT called_ae, route, study_uid FROM instances WHERE id=?",
                               (instance_id,)).fetchone())

    @staticmethod
    def _add_deliveries(c: Database, instance_id: int, deliveries: Iterable[NewDelivery],
                        now: float, state: str = "pending") -> None:
        for d in deliveries:
            c.execute("INSERT OR IGNORE INTO deliveries (instance_id, destination, kind, sop_uid, path, state, "
                      "next_attempt_at, updated_at) VALUES (?,?,?,?,?,?,?,?)",
                      (instance_id, d.destination, d.kind, d.sop_uid, d.path, state, now, now))

    # -- delivering --------------------------------------------------------------------
    @staticmethod
    def _destination_filter(only: str | None, exclude: Iterable[str]) -> tuple[str, list]:
        if only is not None:
            return " AND destination = ?", [only]
        names = list(exclude)
        if names:
            return f" AND destination NOT IN ({','.join('?' * len(names))})", names
        return "", []

    def due_deliveries(self, now: float | None = None, limit: int = 100, *, only: str | None = None,
                       exclude: Iterable[str] = ()) -> list[DeliveryRow]:
        """Pending deliveries whose time has come (to destination ``only``, or not to ``exclude``)."""
        now = time.time() if now is None else now
        where, params = self._destination_filter(only, exclude)
        rows = self._query("SELECT id, instance_id, destination, kind, sop_uid, path, attempts FROM deliveries "
                           f"WHERE state='pending' AND next_attempt_at <= ?{where} ORDER BY id LIMIT ?",
                           [now, *params, limit])
        return [DeliveryRow(*r) for r in rows]

    def claim_deliveries(self, now: float | None = None, limit: int = 100, *, only: str | None = None,
                         exclude: Iterable[str] = ()) -> list[DeliveryRow]:
        """Lease due deliveries no node holds, the longest due first."""
        now = time.time() if now is None else now
        where, params = self._destination_filter(only, exclude)
        with self._tx() as c:
            ids = self._claim(c, "deliveries", f"state='pending' AND next_attempt_at <= ?{where}", [now, *params],
                              "next_attempt_at, id", limit, now)  # longest due first: index deliveries_claim
            if not ids:
                return []
            rows = c.execute("SELECT id, instance_id, destination, kind, sop_uid, path, attempts FROM deliveries "
                             f"WHERE id IN ({','.join('?' * len(ids))}) ORDER BY id", ids).fetchall()
        return [DeliveryRow(*r) for r in rows]

    def next_delivery_time(self, *, only: str | None = None, exclude: Iterable[str] = (),
                           now: float | None = None) -> float | None:
        """When the next delivery no node holds is due (a held one is its holder's business:
        waiting for it would make an idle deliverer poll without pause)."""
        now = time.time() if now is None else now
        where, params = self._destination_filter(only, exclude)
        rows = self._query("SELECT MIN(next_attempt_at) FROM deliveries WHERE state='pending' AND "
                           f"(lease_until IS NULL OR lease_until < ?){where}", [now, *params])
        return None if rows[0][0] is None else float(rows[0][0])

    def record_delivery_results(self, results: Iterable[tuple[DeliveryRow, bool, str | None]],
                                max_attempts: int, delay_for, now: float | None = None) -> tuple[int, int, int]:
        """Apply delivery outcomes; returns (delivered, retrying, failed) counts.

        ``delay_for(attempt)`` gives the back-off after failed attempt number ``attempt``.
        A delivery whose lease passed to another node is left to that node (not counted).
        """
        now = time.time() if now is None else now
        counts = [0, 0, 0]
        touched: set[int] = set()
        fence, mine = self._fence()
        results = list(results)
        self._let_go("deliveries", [row.id for row, _, _ in results])
        with self._tx() as c:
            for row, ok, error in results:
                attempts = row.attempts + 1
                outcome = "delivered" if ok else ("failed" if attempts >= max_attempts else "retry")
                error = (error or "")[:500]
                sets, values = {
                    "delivered": ("state='delivered', attempts=?, last_error=NULL", (attempts,)),
                    "failed": ("state='failed', attempts=?, last_error=?", (attempts, error)),
                    "retry": ("attempts=?, last_error=?, next_attempt_at=?",
                              (attempts, error, now + float(delay_for(attempts)))),
                }[outcome]
                changed = c.execute(f"UPDATE deliveries SET {sets}, updated_at=?, lease_owner=NULL, lease_until=NULL "
                                    f"WHERE id=?{fence}", (*values, now, row.id, *mine)).rowcount
                if not changed:
                    continue  # another node took it over: its outcome counts
                touched.add(row.instance_id)
                bump(c, "deliveries", destination=row.destination, outcome=outcome)
                if ok:
                    counts[0] += 1
                    continue
                if attempts >= max_attempts:
                    counts[2] += 1
                    called_ae, route, study_uid = self._place(c, row.instance_id)
                    self._notify(c, "delivery.failed", {
                        "called_ae": called_ae, "route": route, "study_uid": study_uid, "destination": row.destination,
                        "kind": row.kind, "sop_uid": row.sop_uid, "attempts": attempts, "error": error[:300]},
                        study_uid, now)
                else:
                    counts[1] += 1
            self._finish_if_done(c, touched, now)
        return counts[0], counts[1], counts[2]

    def _finish_if_done(self, c: Database, instance_ids: Iterable[int], now: float) -> None:
        """A translated instance becomes delivered (all ok) or failed (any gave up, none pending);
        a study whose every instance is now delivered is announced (``study.delivered``)."""
        finished: set[tuple[str, str, str]] = set()
        for iid in instance_ids:
            st = dict(c.execute("SELECT state, COUNT(*) FROM deliveries WHERE instance_id=? GROUP BY state",
                                (iid,)).fetchall())
            if st.get("pending"):
                continue
            new = "failed" if st.get("failed") else "delivered"
            if c.execute("UPDATE instances SET state=?, updated_at=? WHERE id=? AND state='translated'",
                         (new, now, iid)).rowcount and new == "delivered":
                finished.add(self._place(c, iid))
        for called_ae, route, study_uid in finished:
            states = dict(c.execute("SELECT state, COUNT(*) FROM instances WHERE called_ae=? AND route=? AND "
                                    "study_uid=? GROUP BY state", (called_ae, route, study_uid)).fetchall())
            if any(states.get(s) for s in ("received", "ready", "translated", "withheld", "failed")):
                continue  # more of this study to come, or something needs an operator
            destinations = [d for (d,) in c.execute(
                "SELECT DISTINCT d.destination FROM deliveries d JOIN instances i ON i.id=d.instance_id WHERE "
                "i.called_ae=? AND i.route=? AND i.study_uid=? AND d.kind='output'", (called_ae, route, study_uid))]
            self._notify(c, "study.delivered", {"called_ae": called_ae, "route": route, "study_uid": study_uid,
                                                "instances": int(states.get("delivered", 0)),
                                                "destinations": sorted(destinations)}, study_uid, now)

    # -- spool clean-up: finished_unpurged, mark_purged in dicom_node.reprocessing ------
    def forget_older_than(self, seconds: float, now: float | None = None) -> int:
        """Drop rows of instances finished and purged more than ``seconds`` ago; returns how many.

        Keeps the database small on a busy node.  Within the window a re-sent duplicate is
        recognised; after it, it is translated again, to the same output UIDs (harmless).
        """
        now = time.time() if now is None else now
        cutoff = now - seconds
        with self._tx() as c:
            ids = [r[0] for r in c.execute("SELECT id FROM instances INDEXED BY instances_state WHERE "
                                           "state IN ('delivered','unmatched','unsupported','discarded') AND purged=1 "
                                           "AND updated_at < ?", (cutoff,))]
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                c.execute(f"DELETE FROM deliveries WHERE instance_id IN ({marks})", chunk)
                c.execute(f"DELETE FROM instances WHERE id IN ({marks})", chunk)
            c.execute("DELETE FROM studies WHERE state='released' AND last_received_at < ?", (cutoff,))
            if ids:
                c.execute("DELETE FROM study_info WHERE NOT EXISTS "
                          "(SELECT 1 FROM instances i WHERE i.study_uid=study_info.study_uid)")
            self._forget_operations(c, cutoff)
            self.forget_nodes(c, cutoff)
            c.execute("DELETE FROM notifications WHERE state='sent' AND updated_at < ?", (cutoff,))
        return len(ids)

    # -- operator commands -------------------------------------------------------------
    def retry_failed(self, now: float | None = None, *, instance_ids: Iterable[int] | None = None,
                     user: str | None = None) -> tuple[int, int]:
        """Requeue failed deliveries and failed translations (of ``instance_ids`` only, when
        given); returns (deliveries, instances).  ``user``: record it as an operator action."""
        now = time.time() if now is None else now
        only, params = "", []
        if instance_ids is not None:
            ids = [int(i) for i in instance_ids]
            only, params = f" AND instance_id IN ({','.join('?' * len(ids)) or 'NULL'})", ids
        with self._tx() as c:
            nd = c.execute("UPDATE deliveries SET state='pending', attempts=0, next_attempt_at=?, updated_at=? "
                           f"WHERE state='failed'{only}", (now, now, *params)).rowcount
            mine = only.replace("instance_id", "id")
            # failed with deliveries: delivery gave up -> back to translated; else translation failed -> ready
            c.execute("UPDATE instances SET state='translated', updated_at=? WHERE state='failed' AND EXISTS "
                      "(SELECT 1 FROM deliveries d WHERE d.instance_id=instances.id AND d.kind='output')"
                      f"{mine}", (now, *params))
            ni = c.execute(f"UPDATE instances SET state='ready', error=NULL, updated_at=? WHERE state='failed'{mine}",
                           (now, *params)).rowcount
            if user is not None:
                self._action(c, user, "requeue", "all failed" if instance_ids is None else
                             "instances " + ",".join(map(str, params)), f"{nd} deliveries, {ni} translations")
        return nd, ni

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        inst = dict(self._query("SELECT state, COUNT(*) FROM instances GROUP BY state"))
        dels = dict(self._query("SELECT state, COUNT(*) FROM deliveries GROUP BY state"))
        return ({s: int(inst.get(s, 0)) for s in INSTANCE_STATES},
                {s: int(dels.get(s, 0)) for s in DELIVERY_STATES})

    def destination_summary(self) -> list[tuple[str, int, int, int, str | None]]:
        """Per destination: (name, pending, failed, most attempts so far, latest error)."""
        rows = self._query(
            "SELECT destination, SUM(state='pending'), SUM(state='failed'), MAX(attempts), "
            "(SELECT last_error FROM deliveries e WHERE e.destination=d.destination AND e.last_error IS NOT NULL "
            " AND e.state!='delivered' ORDER BY e.updated_at DESC LIMIT 1) "
            "FROM deliveries d WHERE state IN ('pending','failed') GROUP BY destination ORDER BY destination")
        return [(str(n), int(p or 0), int(f or 0), int(a or 0), e) for n, p, f, a, e in rows]

    def oldest_waiting(self) -> tuple[str, str, float] | None:
        """(what, abbreviated UID, since) of the oldest unfinished item, or None."""
        candidates = []
        rows = self._query("SELECT state, sop_uid, received_at FROM instances WHERE state IN "
                           "('received','ready','translated') ORDER BY received_at LIMIT 1")
        if rows:
            candidates.append((f"instance {rows[0][0]}", abbreviate(rows[0][1]), float(rows[0][2])))
        rows = self._query("SELECT d.destination, d.sop_uid, i.received_at FROM deliveries d JOIN instances i "
                           "ON i.id=d.instance_id WHERE d.state='pending' ORDER BY i.received_at LIMIT 1")
        if rows:
            candidates.append((f"delivery to {rows[0][0]}", abbreviate(rows[0][1]), float(rows[0][2])))
        return min(candidates, key=lambda t: t[2]) if candidates else None

    def instances(self, state: str | None = None) -> Iterator[InstanceRow]:
        sql = f"SELECT {_INSTANCE_COLS} FROM instances"
        rows = self._query(sql + (" WHERE state=? ORDER BY id" if state else " ORDER BY id"),
                           (state,) if state else ())
        return (InstanceRow(*r) for r in rows)


def abbreviate(uid: str) -> str:
    """UIDs in logs: the last 8 characters are enough to correlate, and say nothing about the patient."""
    return "..." + uid[-8:] if len(uid) > 8 else uid

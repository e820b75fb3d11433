"""The node's durable state machine: SQLite in the spool (WAL, synchronous=FULL) or PostgreSQL.

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

Deliveries and their states: :mod:`dicom_node.delivery_queue`.  Every output also gets a row
in ``outputs``, the audit trail (:mod:`dicom_node.audit_trail`), kept when old instance rows
are forgotten.  The tables: :mod:`dicom_node.state_schema`.

Study timers live in the ``studies`` table (:mod:`dicom_node.study_timers`), so a restart
does not lose or prematurely release a pending study.  Rows name their route by its
``name`` (never by its position in the config), so editing or reordering routes never
misroutes queued work; databases from before route names are migrated at start
(:meth:`StateDB.name_routes`).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from dicom_node.audit_trail import AuditTrail
from dicom_node.cluster import Cluster, LeaseLost
from dicom_node.console_queries import ConsoleQueries
from dicom_node.counters import Counters, bump
from dicom_node.database import Connection, Database, is_conflict
from dicom_node.delivery_queue import DeliveryQueue, place
from dicom_node.operations_log import OperationsLog
from dicom_node.outbox import Events, NotificationOutbox
from dicom_node.records import INSTANCE_COLS, DeliveryRow, InstanceRow, NewDelivery, OutputRecord
from dicom_node.reprocessing import SourceKeeping
from dicom_node.state_schema import create_schema
from dicom_node.study_timers import Studies

if TYPE_CHECKING:
    from dicom_node.config import NodeConfig

__all__ = ["StateDB", "InstanceRow", "DeliveryRow", "NewDelivery", "OutputRecord", "INSTANCE_STATES",
           "DELIVERY_STATES", "STUDY_INFO_KEYWORDS", "abbreviate"]

INSTANCE_STATES = ("received", "ready", "translated", "delivered", "failed", "unmatched", "unsupported", "withheld",
                   "discarded")
DELIVERY_STATES = ("pending", "delivered", "failed", "held")

STUDY_INFO_KEYWORDS = {"PatientName": "patient_name", "PatientID": "patient_id", "AccessionNumber": "accession",
                       "StudyDate": "study_date", "StudyDescription": "description", "Modality": "modality"}


class StateDB:
    """The state machine of instances and studies, and the parts that share its database.

    Parts (each an object on the same :class:`~dicom_node.database.Database`): ``deliveries``
    (:mod:`dicom_node.delivery_queue`), ``audit`` (the audit trail and withheld outputs,
    :mod:`dicom_node.audit_trail`), ``counters`` (:mod:`dicom_node.counters`), ``operations``
    (the association and operator logs, :mod:`dicom_node.operations_log`), ``console`` (the
    console's reads, :mod:`dicom_node.console_queries`), ``outbox`` (the webhook outbox,
    :mod:`dicom_node.outbox`), ``cluster`` (nodes and leases, :mod:`dicom_node.cluster`),
    ``sources`` (reprocessing and the spool's clean-up, :mod:`dicom_node.reprocessing`),
    ``studies`` (the studies' quiet periods, :mod:`dicom_node.study_timers`).
    ``events`` (the config's webhooks, :class:`~dicom_node.outbox.Events`) is what a change
    raises; open the database of a config with :meth:`for_config`, so the node, the console and
    every CLI command raise events alike.
    """

    def __init__(self, target: Path | str, *, events: Events | None = None, lease_seconds: float = 30.0,
                 timeout: float = 30.0) -> None:
        """``target``: the SQLite file, or a ``postgresql://`` URL (:mod:`dicom_node.database`);
        ``events``: None raises events to no webhook (tests, benchmarks)."""
        self.database = Database(target, timeout=timeout)
        self.path = self.database.target
        create_schema(self.database)
        if isinstance(self.path, Path):
            try:
                self.path.chmod(0o600)
            except OSError:
                pass
        self.events = events if events is not None else Events()
        self.cluster = Cluster(self.database, lease_seconds)
        self.counters = Counters(self.database)
        self.operations = OperationsLog(self.database)
        self.console = ConsoleQueries(self.database)
        self.outbox = NotificationOutbox(self.database, self.cluster)
        self.deliveries = DeliveryQueue(self.database, self.cluster, self.events)
        self.audit = AuditTrail(self.database, self.deliveries)
        self.sources = SourceKeeping(self.database)
        self.studies = Studies(self.database)

    @classmethod
    def for_config(cls, config: NodeConfig, target: Path | str, *, events: Events | None = None) -> StateDB:
        """The state database ``target`` as ``config`` uses it: its webhooks (``events``: a sink
        to share, else one from the config) and its lease length."""
        return cls(target, events=events if events is not None else Events.from_config(config),
                   lease_seconds=config.storage.lease_seconds)

    def close(self) -> None:
        self.database.close()

    # -- receiving ---------------------------------------------------------------------
    def find_instance(self, called_ae: str, sop_uid: str) -> InstanceRow | None:
        rows = self.database.query(f"SELECT {INSTANCE_COLS} FROM instances WHERE called_ae=? AND sop_uid=?",
                                   (called_ae, sop_uid))
        return InstanceRow(*rows[0]) if rows else None

    def record_received(
        self, *, called_ae: str, calling_ae: str, sop_uid: str, sop_class: str, study_uid: str,
        series_uid: str, route: str | None, matched: bool, path: str, size: int,
        forward: Iterable[str] = (), now: float | None = None, study: dict[str, str] | None = None,
        content_sha256: str | None = None, protocol: str = "dimse",
    ) -> tuple[int, bool]:
        """Record an acknowledged instance; returns (row id, is_new).

        A matched instance joins its study's quiet-period timer; an unmatched one is kept
        (state ``unmatched``) and its original queued for the ``forward`` destinations.
        A duplicate (same called AE + SOP Instance UID) changes nothing except that, while
        its study is still receiving, it restarts the study's quiet period.  ``study``: the
        console's study description (keys of ``STUDY_INFO_KEYWORDS``' values), kept once.
        ``protocol``: how it arrived (``dimse`` or ``stow-rs``), a label of the received counter.
        """
        now = time.time() if now is None else now

        def once() -> tuple[int, bool]:
            with self.database.tx() as conn:
                row = conn.execute("SELECT id, state, route FROM instances WHERE called_ae=? AND sop_uid=?",
                                (called_ae, sop_uid)).fetchone()
                if row is not None:
                    if row[1] == "received" and row[2] is not None:
                        conn.execute("UPDATE studies SET last_received_at=? WHERE called_ae=? AND route=? "
                                  "AND study_uid=? AND state='pending'", (now, called_ae, row[2], study_uid))
                    return int(row[0]), False
                state = "received" if matched else "unmatched"
                iid = conn.insert_id(
                    "INSERT INTO instances (called_ae, calling_ae, sop_uid, sop_class, study_uid, series_uid, "
                    "route, path, size, state, received_at, updated_at, content_sha256) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (called_ae, calling_ae, sop_uid, sop_class, study_uid, series_uid, route, path, size,
                     state, now, now, content_sha256))
                bump(conn, "received", called_ae=called_ae, protocol=protocol)
                if study is not None:
                    info = {col: str(study.get(col) or "")[:200] for col in STUDY_INFO_KEYWORDS.values()}
                    conn.execute(f"INSERT OR IGNORE INTO study_info (study_uid, {', '.join(info)}) "
                              f"VALUES (?{',?' * len(info)})", (study_uid, *info.values()))
                if matched:
                    Studies.join(conn, called_ae, route, study_uid, now)
                else:
                    DeliveryQueue.add(conn, iid, [NewDelivery(d, "original", sop_uid, path) for d in forward], now)
                return iid, True

        try:
            return once()
        except Exception as exc:
            if not is_conflict(exc):
                raise
            # another receiver stored the same instance at this very moment (two nodes of one
            # site): it is a duplicate now
            return once()

    def content_digest(self, instance_id: int) -> str | None:
        """The SHA-256 of the data set an instance holds (None: received before digests were kept)."""
        rows = self.database.query("SELECT content_sha256 FROM instances WHERE id=?", (int(instance_id),))
        return rows[0][0] if rows else None

    def record_revision(self, instance_id: int, *, calling_ae: str, path: str, size: int, content_sha256: str,
                        forward: Iterable[str] = (), now: float | None = None, protocol: str = "dimse") -> int:
        """A resend of a known instance whose content differs (corrected demographics, same SOP
        Instance UID): it is processed again from the start; returns its revision number.

        The row goes back to ``received`` (its study gets a new quiet period) with the new file,
        whatever it was doing: a translation of the old content in progress loses its lease
        (its result is dropped, :class:`LeaseLost`), and its deliveries are replaced.  The new
        output has the same UIDs (they are derived from the source UIDs and the model), so the
        PACS replaces the old one; its audit row records the revision.  An unmatched instance forwards the new original again.
        """
        now = time.time() if now is None else now
        with self.database.tx() as conn:
            called_ae, route, study_uid, sop_uid, state = conn.execute(
                "SELECT called_ae, route, study_uid, sop_uid, state FROM instances WHERE id=?",
                (instance_id,)).fetchone()
            matched = route is not None and state != "unmatched"
            conn.execute("UPDATE instances SET calling_ae=?, path=?, size=?, content_sha256=?, revision=revision+1, "
                      "state=?, error=NULL, purged=0, updated_at=?, lease_owner=NULL, lease_until=NULL WHERE id=?",
                      (calling_ae, path, size, content_sha256, "received" if matched else "unmatched", now,
                       instance_id))
            self.cluster.let_go("instances", [instance_id])
            # The old content's deliveries (sent, pending, or in flight: a deliverer's result for a
            # row that is gone is dropped) make way for the new output's, which reuse their keys.
            conn.execute("DELETE FROM deliveries WHERE instance_id=?", (instance_id,))
            bump(conn, "received", called_ae=called_ae, protocol=protocol)
            if matched:
                Studies.join(conn, called_ae, route, study_uid, now)
            else:
                DeliveryQueue.add(conn, instance_id, [NewDelivery(d, "original", sop_uid, path) for d in forward], now)
            return int(conn.execute("SELECT revision FROM instances WHERE id=?", (instance_id,)).fetchone()[0])

    # -- grouping ----------------------------------------------------------------------
    def name_routes(self, names: list[str]) -> int:
        """A database from before route names: rows that name their route by position get the
        name of the route at that position in the config the node starts with."""
        if self.database.dialect != "sqlite":
            return 0  # PostgreSQL databases were made with route names
        with self.database.tx() as conn:
            n = 0
            for table in ("instances", "studies"):
                for index, name in enumerate(names):
                    n += conn.execute(f"UPDATE {table} SET route=? WHERE typeof(route)='integer' AND route=?",
                                   (name, index)).rowcount
        return n

    # -- translating -------------------------------------------------------------------
    def ready_instances(self, limit: int) -> list[InstanceRow]:
        """The oldest ``ready`` instances (claimed or not)."""
        rows = self.database.query(f"SELECT {INSTANCE_COLS} FROM instances WHERE state='ready' ORDER BY id LIMIT ?",
                                   (limit,))
        return [InstanceRow(*r) for r in rows]

    def claim_ready(self, prefer: Iterable[str] | None = None, now: float | None = None) -> InstanceRow | None:
        """Lease the oldest ``ready`` instance no node holds; None when there is none.

        ``prefer``: route names to take first (a worker's routes whose model it has loaded);
        None: any route, oldest first.
        """
        now = time.time() if now is None else now
        prefer = None if prefer is None else list(prefer)
        with self.database.tx() as conn:
            ids: list[int] = []
            if prefer:
                ids = self.cluster.claim(conn, "instances", f"state='ready' AND route IN ({','.join('?' * len(prefer))})",
                                         prefer, "id", 1, now)
            if not ids:
                ids = self.cluster.claim(conn, "instances", "state='ready'", (), "id", 1, now)
            if not ids:
                return None
            return InstanceRow(*conn.execute(f"SELECT {INSTANCE_COLS} FROM instances WHERE id=?", (ids[0],)).fetchone())

    def _finish_claim(self, conn: Connection, instance_id: int, state: str, error: str | None, now: float) -> None:
        """Move a claimed instance on and give back its lease; LeaseLost when it is no longer ours."""
        fence, params = self.cluster.fence()
        self.cluster.let_go("instances", [instance_id])
        if not conn.execute(f"UPDATE instances SET state=?, error=?, updated_at=?, lease_owner=NULL, lease_until=NULL "
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
        with self.database.tx() as conn:
            self._finish_claim(conn, instance_id, "withheld" if withhold else "translated", None, now)
            DeliveryQueue.add(conn, instance_id, [d for d in deliveries if not (withhold and d.kind == "output")], now)
            if withhold:
                DeliveryQueue.add(conn, instance_id, [d for d in deliveries if d.kind == "output"], now, state="held")
            if output is not None:
                AuditTrail.write(conn, instance_id, output, "withheld" if withhold else "forwarded", now)
                called_ae, route, study_uid = place(conn, instance_id)
            counted = model or (output.model if output is not None else "unknown")
            bump(conn, "translated", model=counted)
            if output is not None and output.verdict == "flagged":
                bump(conn, "flagged", model=counted)
                self.events.emit(conn, "output.withheld" if withhold else "output.flagged", {
                    "called_ae": called_ae, "route": route, "study_uid": study_uid, "model": output.model,
                    "model_version": output.model_version, "source_sop_uid": output.source_sop_uid,
                    "output_sop_uid": output.output_sop_uid, "reasons": output.reasons, "action": output.action},
                                 study_uid, now)
            self.deliveries.finish_if_done(conn, [instance_id], now)

    def mark_not_translated(self, instance_id: int, state: str, error: str,
                            deliveries: Iterable[NewDelivery] = (), now: float | None = None) -> None:
        """``unsupported`` (kept; original maybe forwarded) or ``failed`` (``retry`` requeues).

        Like :meth:`mark_translated`, raises :class:`LeaseLost` (and changes nothing) when this
        node's claim on the instance passed to another node."""
        assert state in ("unsupported", "failed")
        now = time.time() if now is None else now
        with self.database.tx() as conn:
            self._finish_claim(conn, instance_id, state, error[:500], now)
            DeliveryQueue.add(conn, instance_id, deliveries, now)

    # -- spool clean-up: finished_unpurged, mark_purged in dicom_node.reprocessing ------
    def forget_older_than(self, seconds: float, now: float | None = None) -> int:
        """Drop rows of instances finished and purged more than ``seconds`` ago; returns how many.

        Keeps the database small on a busy node.  Within the window a re-sent duplicate is
        recognised; after it, it is translated again, to the same output UIDs (harmless).
        """
        now = time.time() if now is None else now
        cutoff = now - seconds
        with self.database.tx() as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM instances INDEXED BY instances_state WHERE "
                                           "state IN ('delivered','unmatched','unsupported','discarded') AND purged=1 "
                                           "AND updated_at < ?", (cutoff,))]
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                conn.execute(f"DELETE FROM deliveries WHERE instance_id IN ({marks})", chunk)
                conn.execute(f"DELETE FROM instances WHERE id IN ({marks})", chunk)
            conn.execute("DELETE FROM studies WHERE state='released' AND last_received_at < ?", (cutoff,))
            if ids:
                conn.execute("DELETE FROM study_info WHERE NOT EXISTS "
                          "(SELECT 1 FROM instances i WHERE i.study_uid=study_info.study_uid)")
            OperationsLog.forget(conn, cutoff)
            self.cluster.forget_nodes(conn, cutoff)
            NotificationOutbox.forget(conn, cutoff)
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
        with self.database.tx() as conn:
            nd = conn.execute("UPDATE deliveries SET state='pending', attempts=0, next_attempt_at=?, updated_at=? "
                           f"WHERE state='failed'{only}", (now, now, *params)).rowcount
            mine = only.replace("instance_id", "id")
            # failed with deliveries: delivery gave up -> back to translated; else translation failed -> ready
            conn.execute("UPDATE instances SET state='translated', updated_at=? WHERE state='failed' AND EXISTS "
                      "(SELECT 1 FROM deliveries d WHERE d.instance_id=instances.id AND d.kind='output')"
                      f"{mine}", (now, *params))
            ni = conn.execute(f"UPDATE instances SET state='ready', error=NULL, updated_at=? WHERE state='failed'{mine}",
                           (now, *params)).rowcount
            if user is not None:
                target = "all failed" if instance_ids is None else "instances " + ",".join(map(str, params))
                OperationsLog.write_action(conn, user, "requeue", target, f"{nd} deliveries, {ni} translations")
        return nd, ni

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        inst = dict(self.database.query("SELECT state, COUNT(*) FROM instances GROUP BY state"))
        dels = dict(self.database.query("SELECT state, COUNT(*) FROM deliveries GROUP BY state"))
        return ({s: int(inst.get(s, 0)) for s in INSTANCE_STATES},
                {s: int(dels.get(s, 0)) for s in DELIVERY_STATES})

    def destination_summary(self) -> list[tuple[str, int, int, int, str | None]]:
        """Per destination: (name, pending, failed, most attempts so far, latest error)."""
        rows = self.database.query(
            "SELECT destination, SUM(state='pending'), SUM(state='failed'), MAX(attempts), "
            "(SELECT last_error FROM deliveries e WHERE e.destination=d.destination AND e.last_error IS NOT NULL "
            " AND e.state!='delivered' ORDER BY e.updated_at DESC LIMIT 1) "
            "FROM deliveries d WHERE state IN ('pending','failed') GROUP BY destination ORDER BY destination")
        return [(str(n), int(p or 0), int(f or 0), int(a or 0), e) for n, p, f, a, e in rows]

    def oldest_waiting(self) -> tuple[str, str, float] | None:
        """(what, abbreviated UID, since) of the oldest unfinished item, or None."""
        candidates = []
        rows = self.database.query("SELECT state, sop_uid, received_at FROM instances WHERE state IN "
                                   "('received','ready','translated') ORDER BY received_at LIMIT 1")
        if rows:
            candidates.append((f"instance {rows[0][0]}", abbreviate(rows[0][1]), float(rows[0][2])))
        rows = self.database.query("SELECT d.destination, d.sop_uid, i.received_at FROM deliveries d JOIN instances i "
                                   "ON i.id=d.instance_id WHERE d.state='pending' ORDER BY i.received_at LIMIT 1")
        if rows:
            candidates.append((f"delivery to {rows[0][0]}", abbreviate(rows[0][1]), float(rows[0][2])))
        return min(candidates, key=lambda t: t[2]) if candidates else None

    def instances(self, state: str | None = None) -> Iterator[InstanceRow]:
        sql = f"SELECT {INSTANCE_COLS} FROM instances"
        rows = self.database.query(sql + (" WHERE state=? ORDER BY id" if state else " ORDER BY id"),
                                   (state,) if state else ())
        return (InstanceRow(*r) for r in rows)


def abbreviate(uid: str) -> str:
    """UIDs in logs: the last 8 characters are enough to correlate, and say nothing about the patient."""
    return "..." + uid[-8:] if len(uid) > 8 else uid

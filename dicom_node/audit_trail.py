"""The outputs' audit trail and the operator's hand on withheld outputs (``StateDB.audit``).

Why a table of its own: a radiologist or a regulator may ask, months later, which model made
an image and whether the fidelity guard had doubts about it.  ``outputs`` keeps, per output,
the source SOP UID, the model with its weight digest and DeviceUID, the output SOP UID, the
verdict with reasons and scores, and what happened to it (forwarded, withheld, released,
discarded); its rows survive the housekeeper's forgetting of old instance rows.

Withheld outputs wait in the spool until an operator releases them (their deliveries become
pending: the node sends them within a second) or discards them (the outputs' deliveries are
removed, the instance ends ``discarded`` and its files are purged).
"""
from __future__ import annotations

import json
import time
from typing import Any, Iterable

from dicom_node.database import Connection, Database
from dicom_node.delivery_queue import DeliveryQueue, place
from dicom_node.operations_log import OperationsLog
from dicom_node.records import OutputRecord

__all__ = ["AuditTrail", "AUDIT_COLS"]

AUDIT_COLS = ("id", "instance_id", "called_ae", "study_uid", "source_sop_uid", "output_sop_uid", "model",
              "model_version", "model_digest", "device_uid", "verdict", "reasons", "scores", "thresholds", "action",
              "disposition", "created_at", "updated_at", "source_revision", "output_version", "requested_by")


class AuditTrail:
    """The ``outputs`` table: written with each translation, read by ``audit``, ``status`` and
    the console; releasing or discarding a withheld output moves its deliveries on."""

    def __init__(self, database: Database, deliveries: DeliveryQueue) -> None:
        self.database, self.deliveries = database, deliveries

    @staticmethod
    def write(conn: Connection, instance_id: int, output: OutputRecord, disposition: str, now: float) -> None:
        """The audit row of a new output (a resend of the same output updates it), inside the
        transaction that queues the output's deliveries."""
        called_ae, _, study_uid = place(conn, instance_id)
        revision = conn.execute("SELECT revision FROM instances WHERE id=?", (instance_id,)).fetchone()[0]
        conn.execute(
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
             output.action, disposition, now, now, int(revision or 0), output.output_version, output.requested_by))

    def rows(self, *, study_uid: str | None = None, since: float | None = None, verdict: str | None = None,
             newest: int | None = None) -> list[dict[str, Any]]:
        """Audit rows, oldest first: of one study, from a time on, of one verdict, the newest N."""
        where: list[str] = []
        params: list[Any] = []
        if study_uid:
            where.append("study_uid=?")
            params.append(study_uid)
        if since is not None:
            where.append("created_at>=?")
            params.append(float(since))
        if verdict is not None:
            where.append("verdict=?")
            params.append(verdict)
        sql = f"SELECT {', '.join(AUDIT_COLS)} FROM outputs" + (" WHERE " + " AND ".join(where) if where else "")
        if newest:
            sql += f" ORDER BY created_at DESC, id DESC LIMIT {int(newest)}"
        else:
            sql += " ORDER BY created_at, id"
        found = self.database.query(sql, params)
        rows = []
        for r in (reversed(found) if newest else found):
            row = dict(zip(AUDIT_COLS, r))
            for k in ("reasons", "scores", "thresholds"):
                row[k] = json.loads(row[k])
            rows.append(row)
        return rows

    def withheld(self) -> list[dict[str, Any]]:
        """The outputs waiting for an operator (audit rows of withheld instances)."""
        rows = self.database.query(
            "SELECT o.output_sop_uid, o.source_sop_uid, o.study_uid, o.called_ae, o.model, o.reasons, o.created_at "
            "FROM outputs o JOIN instances i ON i.id=o.instance_id WHERE i.state='withheld' "
            "AND o.disposition='withheld' ORDER BY o.created_at")
        return [{"output_sop_uid": o, "source_sop_uid": s, "study_uid": st, "called_ae": ae, "model": m,
                 "reasons": json.loads(r), "since": t} for o, s, st, ae, m, r, t in rows]

    def fidelity_counts(self) -> dict[str, int]:
        """Outputs per verdict and per disposition (for ``status``)."""
        out = {"ok": 0, "flagged": 0, "withheld": 0, "released": 0, "discarded": 0}
        for verdict, n in self.database.query("SELECT verdict, COUNT(*) FROM outputs GROUP BY verdict"):
            out[str(verdict)] = int(n)
        for disposition, n in self.database.query(
                "SELECT disposition, COUNT(*) FROM outputs WHERE disposition!='forwarded' GROUP BY disposition"):
            out[str(disposition)] = int(n)
        return out

    @staticmethod
    def _withheld_ids(conn: Connection, uids: Iterable[str], everything: bool) -> list[tuple[int, str]]:
        """(instance id, output SOP UID) of withheld outputs named by source or output SOP UID,
        or by Study Instance UID; every one with ``everything``."""
        rows = conn.execute("SELECT o.instance_id, o.output_sop_uid, o.source_sop_uid, o.study_uid FROM outputs o "
                         "JOIN instances i ON i.id=o.instance_id WHERE i.state='withheld' "
                         "AND o.disposition='withheld' ORDER BY o.id").fetchall()
        wanted = set(uids)
        return [(int(i), str(o)) for i, o, s, st in rows if everything or wanted & {o, s, st}]

    def release(self, uids: Iterable[str] = (), *, everything: bool = False, now: float | None = None,
                user: str | None = None) -> list[str]:
        """Send withheld outputs after all; returns the released output SOP UIDs."""
        now = time.time() if now is None else now
        with self.database.tx() as conn:
            chosen = self._withheld_ids(conn, uids, everything)
            for iid, out_uid in chosen:
                conn.execute("UPDATE deliveries SET state='pending', next_attempt_at=?, updated_at=? "
                          "WHERE instance_id=? AND state='held'", (now, now, iid))
                conn.execute("UPDATE instances SET state='translated', updated_at=? WHERE id=?", (now, iid))
                conn.execute("UPDATE outputs SET disposition='released', updated_at=? WHERE instance_id=? "
                          "AND output_sop_uid=?", (now, iid, out_uid))
                self.deliveries.finish_if_done(conn, [iid], now)
            self._record(conn, user, "release", uids, everything, chosen)
        return [u for _, u in chosen]

    def discard(self, uids: Iterable[str] = (), *, everything: bool = False, now: float | None = None,
                user: str | None = None) -> list[str]:
        """Drop withheld outputs (never sent); returns the discarded output SOP UIDs."""
        now = time.time() if now is None else now
        with self.database.tx() as conn:
            chosen = self._withheld_ids(conn, uids, everything)
            for iid, out_uid in chosen:
                conn.execute("DELETE FROM deliveries WHERE instance_id=? AND state='held'", (iid,))
                conn.execute("UPDATE instances SET state='discarded', updated_at=? WHERE id=?", (now, iid))
                conn.execute("UPDATE outputs SET disposition='discarded', updated_at=? WHERE instance_id=? "
                          "AND output_sop_uid=?", (now, iid, out_uid))
            self._record(conn, user, "discard", uids, everything, chosen)
        return [u for _, u in chosen]

    @staticmethod
    def _record(conn: Connection, user: str | None, action: str, uids: Iterable[str], everything: bool,
                chosen: list[tuple[int, str]]) -> None:
        """An operator's release or discard, in the operator log (``user`` None: not recorded)."""
        if user is not None:
            OperationsLog.write_action(conn, user, action, "all withheld" if everything else ",".join(uids),
                                       f"{len(chosen)} output(s): " + ",".join(u for _, u in chosen))

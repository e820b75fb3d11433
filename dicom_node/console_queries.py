"""What the operations console reads from the state database (``StateDB.console``).

Read-only queries, each bounded (LIMIT, time windows), run on the console's own connection:
in WAL mode they never block the C-STORE handler's commits.  Patient data (``study_info``)
leaves here only towards the logged-in console.
"""
from __future__ import annotations

import json
import time
from typing import Any

from dicom_node.database import Database

__all__ = ["ConsoleQueries", "THROUGHPUT_BIN_SECONDS"]

THROUGHPUT_BIN_SECONDS = 300  # the overview's chart: 12 bars of 5 minutes for the last hour


class ConsoleQueries:
    """Read-only, bounded queries for the console."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def studies(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recently received studies (per called AE), newest first."""
        rows = self.database.query(
            "SELECT i.study_uid, i.called_ae, MIN(i.route), COUNT(*), MIN(i.received_at), MAX(i.updated_at), "
            "GROUP_CONCAT(i.state), MIN(s.patient_name), MIN(s.patient_id), MIN(s.accession), MIN(s.study_date), "
            "MIN(s.description), MIN(s.modality) FROM instances i LEFT JOIN study_info s ON s.study_uid=i.study_uid "
            "GROUP BY i.study_uid, i.called_ae ORDER BY MAX(i.received_at) DESC LIMIT ?", (int(limit),))
        out = []
        for (uid, ae, route, n, first, last, states, name, pid, acc, date, desc, modality) in rows:
            per_state: dict[str, int] = {}
            for st in (states or "").split(","):
                per_state[st] = per_state.get(st, 0) + 1
            out.append({"study_uid": uid, "called_ae": ae, "route": route, "instances": int(n),
                        "first_received": first, "last_update": last, "states": per_state,
                        "patient_name": name or "", "patient_id": pid or "", "accession": acc or "",
                        "study_date": date or "", "description": desc or "", "modality": modality or ""})
        return out

    def study(self, study_uid: str) -> dict[str, Any] | None:
        """One study: its description, and per instance its state, output, verdict and deliveries."""
        info = self.database.query("SELECT patient_name, patient_id, accession, study_date, description, modality "
                                   "FROM study_info WHERE study_uid=?", (study_uid,))
        rows = self.database.query(
            "SELECT id, called_ae, calling_ae, sop_uid, series_uid, route, state, received_at, updated_at, error, "
            "purged FROM instances WHERE study_uid=? ORDER BY id LIMIT 2000", (study_uid,))
        if not rows and not info:
            return None
        ids = [r[0] for r in rows]
        outputs: dict[int, dict[str, Any]] = {}
        deliveries: dict[int, list[dict[str, Any]]] = {}
        if ids:
            marks = ",".join("?" * len(ids))
            for iid, out_uid, model, version, verdict, reasons, scores, disposition, created in self.database.query(
                    "SELECT instance_id, output_sop_uid, model, model_version, verdict, reasons, scores, disposition, "
                    f"created_at FROM outputs WHERE instance_id IN ({marks}) ORDER BY id", ids):
                outputs[int(iid)] = {"output_sop_uid": out_uid, "model": model, "model_version": version,
                                     "verdict": verdict, "reasons": json.loads(reasons),
                                     "scores": json.loads(scores), "disposition": disposition,
                                     "translated_at": created}
            for iid, dest, kind, state, attempts, error, updated in self.database.query(
                    "SELECT instance_id, destination, kind, state, attempts, last_error, updated_at FROM deliveries "
                    f"WHERE instance_id IN ({marks}) ORDER BY id", ids):
                deliveries.setdefault(int(iid), []).append(
                    {"destination": dest, "kind": kind, "state": state, "attempts": int(attempts),
                     "last_error": error, "updated_at": updated})
        keys = ("patient_name", "patient_id", "accession", "study_date", "description", "modality")
        return {
            "study_uid": study_uid, **(dict(zip(keys, info[0])) if info else dict.fromkeys(keys, "")),
            "instances": [{"id": int(i), "called_ae": ae, "calling_ae": calling, "sop_uid": sop, "series_uid": series,
                           "route": route, "state": state, "received_at": received, "updated_at": updated,
                           "error": error, "purged": bool(purged), "output": outputs.get(int(i)),
                           "deliveries": deliveries.get(int(i), [])}
                          for i, ae, calling, sop, series, route, state, received, updated, error, purged in rows],
        }

    def failures(self, limit: int = 200) -> dict[str, list[dict[str, Any]]]:
        """Failed translations and deliveries given up, newest first."""
        translations = self.database.query(
            "SELECT id, called_ae, sop_uid, study_uid, error, updated_at FROM instances WHERE state='failed' "
            "AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.instance_id=instances.id AND d.state='failed') "
            "ORDER BY updated_at DESC LIMIT ?", (int(limit),))
        deliveries = self.database.query(
            "SELECT d.instance_id, d.destination, d.kind, d.sop_uid, i.study_uid, d.attempts, d.last_error, "
            "d.updated_at FROM deliveries d JOIN instances i ON i.id=d.instance_id WHERE d.state='failed' "
            "ORDER BY d.updated_at DESC LIMIT ?", (int(limit),))
        return {
            "translations": [{"instance_id": int(i), "called_ae": ae, "sop_uid": sop, "study_uid": st, "error": e,
                              "at": t} for i, ae, sop, st, e, t in translations],
            "deliveries": [{"instance_id": int(i), "destination": dest, "kind": kind, "sop_uid": sop, "study_uid": st,
                            "attempts": int(a), "last_error": e, "at": t}
                           for i, dest, kind, sop, st, a, e, t in deliveries],
        }

    def destination_activity(self) -> dict[str, dict[str, Any]]:
        """Per destination: backlog (pending), failed, the last success and the last error."""
        out: dict[str, dict[str, Any]] = {}
        for dest, pending, failed, held, ok_at, err_at in self.database.query(
                "SELECT destination, SUM(state='pending'), SUM(state='failed'), SUM(state='held'), "
                "MAX(CASE WHEN state='delivered' THEN updated_at END), "
                "MAX(CASE WHEN last_error IS NOT NULL THEN updated_at END) FROM deliveries GROUP BY destination"):
            error = None
            if err_at is not None:
                found = self.database.query("SELECT last_error FROM deliveries WHERE destination=? AND "
                                            "last_error IS NOT NULL ORDER BY updated_at DESC LIMIT 1", (dest,))
                error = found[0][0] if found else None
            out[str(dest)] = {"pending": int(pending or 0), "failed": int(failed or 0), "held": int(held or 0),
                              "last_success": ok_at, "last_error": error, "last_error_at": err_at}
        return out

    def throughput(self, seconds: float = 3600.0, bin_seconds: float = THROUGHPUT_BIN_SECONDS,
                   now: float | None = None) -> dict[str, list[int]]:
        """Instances received, outputs translated and deliveries done per time bin (oldest first)."""
        now = time.time() if now is None else now
        start = now - seconds
        bins = max(1, int(round(seconds / bin_seconds)))
        sources = {
            "received": "SELECT received_at FROM instances WHERE received_at >= ?",
            "translated": "SELECT created_at FROM outputs WHERE created_at >= ?",
            "delivered": "SELECT updated_at FROM deliveries WHERE state='delivered' AND updated_at >= ?",
        }
        out: dict[str, list[int]] = {}
        for name, sql in sources.items():
            counts = [0] * bins
            for (t,) in self.database.query(sql, (start,)):
                counts[min(bins - 1, max(0, int((float(t) - start) // bin_seconds)))] += 1
            out[name] = counts
        return out

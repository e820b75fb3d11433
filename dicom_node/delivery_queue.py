"""The deliveries of outputs and originals (``StateDB.deliveries``): claimed, sent, recorded.

One row per (instance, destination, file); states ``pending`` -> ``delivered`` | ``failed``
(after ``max_attempts``), and ``held`` for a withheld output's delivery until an operator
releases (-> ``pending``) or discards it (removed).  When an instance's last delivery is done,
the instance becomes ``delivered`` (or ``failed``); when a study's last instance is delivered,
``study.delivered`` is raised, and ``delivery.failed`` when one is given up - in the same
transaction, through the :class:`~dicom_node.outbox.Events` sink the database was opened with.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

from dicom_node.cluster import Cluster
from dicom_node.counters import bump
from dicom_node.database import Connection, Database
from dicom_node.outbox import Events
from dicom_node.records import DeliveryRow, NewDelivery

__all__ = ["DeliveryQueue", "place"]

_DELIVERY_COLS = "id, instance_id, destination, kind, sop_uid, path, attempts"


def place(conn: Connection, instance_id: int) -> tuple[str, str | None, str]:
    """(called AE, route name, Study Instance UID) of an instance: what events report."""
    called_ae, route, study_uid = conn.execute("SELECT called_ae, route, study_uid FROM instances WHERE id=?",
                                            (instance_id,)).fetchone()
    return called_ae, route, study_uid


class DeliveryQueue:
    """Deliveries in, due deliveries out to the deliverers, their outcomes back."""

    def __init__(self, database: Database, cluster: Cluster, events: Events) -> None:
        self.database, self.cluster, self.events = database, cluster, events

    @staticmethod
    def add(conn: Connection, instance_id: int, deliveries: Iterable[NewDelivery], now: float,
            state: str = "pending") -> None:
        """Queue deliveries of an instance, inside the caller's transaction (a repeat is ignored)."""
        for d in deliveries:
            conn.execute("INSERT OR IGNORE INTO deliveries (instance_id, destination, kind, sop_uid, path, state, "
                      "next_attempt_at, updated_at) VALUES (?,?,?,?,?,?,?,?)",
                      (instance_id, d.destination, d.kind, d.sop_uid, d.path, state, now, now))

    @staticmethod
    def _destination_filter(only: str | None, exclude: Iterable[str]) -> tuple[str, list[str]]:
        if only is not None:
            return " AND destination = ?", [only]
        names = list(exclude)
        if names:
            return f" AND destination NOT IN ({','.join('?' * len(names))})", names
        return "", []

    def due(self, now: float | None = None, limit: int = 100, *, only: str | None = None,
            exclude: Iterable[str] = ()) -> list[DeliveryRow]:
        """Pending deliveries whose time has come (to destination ``only``, or not to ``exclude``)."""
        now = time.time() if now is None else now
        where, params = self._destination_filter(only, exclude)
        rows = self.database.query(f"SELECT {_DELIVERY_COLS} FROM deliveries "
                                   f"WHERE state='pending' AND next_attempt_at <= ?{where} ORDER BY id LIMIT ?",
                                   [now, *params, limit])
        return [DeliveryRow(*r) for r in rows]

    def claim(self, now: float | None = None, limit: int = 100, *, only: str | None = None,
              exclude: Iterable[str] = ()) -> list[DeliveryRow]:
        """Lease due deliveries no node holds, the longest due first."""
        now = time.time() if now is None else now
        where, params = self._destination_filter(only, exclude)
        with self.database.tx() as conn:
            ids = self.cluster.claim(conn, "deliveries", f"state='pending' AND next_attempt_at <= ?{where}",
                                     [now, *params], "next_attempt_at, id", limit, now)  # index deliveries_claim
            if not ids:
                return []
            rows = conn.execute(f"SELECT {_DELIVERY_COLS} FROM deliveries "
                             f"WHERE id IN ({','.join('?' * len(ids))}) ORDER BY id", ids).fetchall()
        return [DeliveryRow(*r) for r in rows]

    def next_time(self, *, only: str | None = None, exclude: Iterable[str] = (),
                  now: float | None = None) -> float | None:
        """When the next delivery no node holds is due (a held one is its holder's business:
        waiting for it would make an idle deliverer poll without pause)."""
        now = time.time() if now is None else now
        where, params = self._destination_filter(only, exclude)
        rows = self.database.query("SELECT MIN(next_attempt_at) FROM deliveries WHERE state='pending' AND "
                                   f"(lease_until IS NULL OR lease_until < ?){where}", [now, *params])
        return None if rows[0][0] is None else float(rows[0][0])

    def record_results(self, results: Iterable[tuple[DeliveryRow, bool, str | None]], max_attempts: int,
                       delay_for: Callable[[int], float], now: float | None = None) -> tuple[int, int, int]:
        """Apply delivery outcomes; returns (delivered, retrying, failed) counts.

        ``delay_for(attempt)`` gives the back-off after failed attempt number ``attempt``.
        A delivery whose lease passed to another node is left to that node (not counted).
        """
        now = time.time() if now is None else now
        counts = [0, 0, 0]
        touched: set[int] = set()
        fence, mine = self.cluster.fence()
        results = list(results)
        self.cluster.let_go("deliveries", [row.id for row, _, _ in results])
        with self.database.tx() as conn:
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
                changed = conn.execute(f"UPDATE deliveries SET {sets}, updated_at=?, lease_owner=NULL, lease_until=NULL "
                                    f"WHERE id=?{fence}", (*values, now, row.id, *mine)).rowcount
                if not changed:
                    continue  # another node took it over: its outcome counts
                touched.add(row.instance_id)
                bump(conn, "deliveries", destination=row.destination, outcome=outcome)
                if ok:
                    counts[0] += 1
                    continue
                if attempts >= max_attempts:
                    counts[2] += 1
                    called_ae, route, study_uid = place(conn, row.instance_id)
                    self.events.emit(conn, "delivery.failed", {
                        "called_ae": called_ae, "route": route, "study_uid": study_uid, "destination": row.destination,
                        "kind": row.kind, "sop_uid": row.sop_uid, "attempts": attempts, "error": error[:300]},
                                     study_uid, now)
                else:
                    counts[1] += 1
            self.finish_if_done(conn, touched, now)
        return counts[0], counts[1], counts[2]

    def finish_if_done(self, conn: Connection, instance_ids: Iterable[int], now: float) -> None:
        """A translated instance becomes delivered (all ok) or failed (any gave up, none pending);
        a study whose every instance is now delivered is announced (``study.delivered``)."""
        finished: set[tuple[str, str | None, str]] = set()
        for iid in instance_ids:
            st = dict(conn.execute("SELECT state, COUNT(*) FROM deliveries WHERE instance_id=? GROUP BY state",
                                (iid,)).fetchall())
            if st.get("pending"):
                continue
            new = "failed" if st.get("failed") else "delivered"
            if conn.execute("UPDATE instances SET state=?, updated_at=? WHERE id=? AND state='translated'",
                         (new, now, iid)).rowcount and new == "delivered":
                finished.add(place(conn, iid))
        for called_ae, route, study_uid in finished:
            states = dict(conn.execute("SELECT state, COUNT(*) FROM instances WHERE called_ae=? AND route=? AND "
                                    "study_uid=? GROUP BY state", (called_ae, route, study_uid)).fetchall())
            if any(states.get(s) for s in ("received", "ready", "translated", "withheld", "failed")):
                continue  # more of this study to come, or something needs an operator
            destinations = [d for (d,) in conn.execute(
                "SELECT DISTINCT d.destination FROM deliveries d JOIN instances i ON i.id=d.instance_id WHERE "
                "i.called_ae=? AND i.route=? AND i.study_uid=? AND d.kind='output'", (called_ae, route, study_uid))]
            self.events.emit(conn, "study.delivered", {"called_ae": called_ae, "route": route, "study_uid": study_uid,
                                                    "instances": int(states.get("delivered", 0)),
                                                    "destinations": sorted(destinations)}, study_uid, now)

"""The webhook outbox in the state database: events in, due notifications out.

Why an outbox: an event is written in the same transaction as the change it reports (a study
delivered, a delivery given up, an output flagged or withheld), so a crash or a restart loses
none; the sender threads (:mod:`dicom_node.notifications`) read it, so a slow or dead receiver
never holds up receiving, translating or delivering.

Why an :class:`Events` sink built from the config and handed to the state database: which
webhooks want which events, and the node's AE title in each body, are configuration; every
process that changes the state (the node, the console, a CLI command such as ``dicom-node
release``) opens its database with the sink of its config, so an event is queued the same way
whichever of them raised it.
"""
from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, Iterable

from dicom_node.cluster import Cluster
from dicom_node.counters import bump
from dicom_node.database import Connection, Database

if TYPE_CHECKING:
    from dicom_node.config import NodeConfig, WebhookSettings

__all__ = ["NOTIFICATIONS_SCHEMA", "Events", "NotificationOutbox", "BATCH"]

BATCH = 20

NOTIFICATIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS notifications (
    id              INTEGER PRIMARY KEY,
    webhook         TEXT NOT NULL,           -- the webhook's name in the config
    event           TEXT NOT NULL,
    body            TEXT NOT NULL,           -- the JSON sent (patient data only with include_phi)
    state           TEXT NOT NULL,           -- pending | sent | failed
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    last_error      TEXT
);
CREATE INDEX IF NOT EXISTS notifications_due ON notifications (state, next_attempt_at);
"""


class Events:
    """The webhooks (config ``notifications``) and the node's AE title: what an event becomes.

    Built from the config (:meth:`from_config`); a reload hands the new one to
    :meth:`configure`.  Without a config (tests, benchmarks) no webhook wants anything.
    """

    def __init__(self, webhooks: Iterable[WebhookSettings] = (), node_ae: str = "") -> None:
        self.webhooks, self.node_ae = list(webhooks), node_ae

    @classmethod
    def from_config(cls, config: NodeConfig) -> Events:
        return cls(config.notifications, config.node.ae_title)

    def configure(self, config: NodeConfig) -> None:
        self.webhooks, self.node_ae = list(config.notifications), config.node.ae_title

    def emit(self, conn: Connection, event: str, payload: dict[str, Any], study_uid: str | None = None,
             now: float | None = None) -> None:
        """Queue ``event`` for every webhook that wants it, inside the caller's transaction."""
        wanted = [w for w in self.webhooks if event in w.events]
        if not wanted:
            return
        now = time.time() if now is None else now
        base = {"event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                "node": self.node_ae, **payload}
        phi = None
        for w in wanted:
            body = dict(base)
            if w.include_phi and study_uid:
                if phi is None:
                    row = conn.execute("SELECT patient_name, patient_id, accession FROM study_info WHERE study_uid=?",
                                    (study_uid,)).fetchone()
                    phi = dict(zip(("patient_name", "patient_id", "accession_number"), row or ("", "", "")))
                body.update(phi)
            conn.execute("INSERT INTO notifications (webhook, event, body, state, next_attempt_at, created_at, "
                      "updated_at) VALUES (?,?,?, 'pending', ?,?,?)", (w.name, event, json.dumps(body), now, now, now))


Notification = tuple[int, str, str, str, int]  # (id, webhook, event, body, attempts)


class NotificationOutbox:
    """Due notifications out to the senders, and their outcomes back (leased like other work)."""

    def __init__(self, database: Database, cluster: Cluster) -> None:
        self.database, self.cluster = database, cluster

    def due(self, limit: int = BATCH, now: float | None = None) -> list[Notification]:
        """(id, webhook, event, body, attempts) of pending notifications whose time has come."""
        now = time.time() if now is None else now
        return [(int(r[0]), str(r[1]), str(r[2]), str(r[3]), int(r[4])) for r in self.database.query(
            "SELECT id, webhook, event, body, attempts FROM notifications WHERE state='pending' AND next_attempt_at<=? "
            "ORDER BY id LIMIT ?", (now, int(limit)))]

    @staticmethod
    def _of_webhooks(webhook: str | None, others_than: list[str] | None) -> tuple[str, tuple[str, ...]]:
        """SQL (and parameters) for: of ``webhook`` only / of none of ``others_than``."""
        if webhook is not None:
            return " AND webhook=?", (webhook,)
        if others_than:
            return f" AND webhook NOT IN ({','.join('?' * len(others_than))})", tuple(others_than)
        return "", ()

    def claim(self, limit: int = BATCH, now: float | None = None, *, webhook: str | None = None,
              others_than: list[str] | None = None) -> list[Notification]:
        """Lease due notifications no node holds (as :meth:`due`): one sender each; of one
        ``webhook`` only, or of webhooks not among ``others_than`` (no longer configured)."""
        now = time.time() if now is None else now
        which, params = self._of_webhooks(webhook, others_than)
        with self.database.tx() as conn:
            ids = self.cluster.claim(conn, "notifications", "state='pending' AND next_attempt_at<=?" + which,
                                     (now, *params), "id", limit, now)
            if not ids:
                return []
            return [(int(r[0]), str(r[1]), str(r[2]), str(r[3]), int(r[4])) for r in conn.execute(
                "SELECT id, webhook, event, body, attempts FROM notifications "
                f"WHERE id IN ({','.join('?' * len(ids))}) ORDER BY id", ids).fetchall()]

    def next_time(self, now: float | None = None, *, webhook: str | None = None) -> float | None:
        """When the next notification (of ``webhook``) no node holds is due."""
        now = time.time() if now is None else now
        which, params = self._of_webhooks(webhook, None)
        rows = self.database.query("SELECT MIN(next_attempt_at) FROM notifications WHERE state='pending' AND "
                                   f"(lease_until IS NULL OR lease_until < ?){which}", (now, *params))
        return None if rows[0][0] is None else float(rows[0][0])

    def record(self, nid: int, webhook: str, ok: bool, error: str | None, attempts: int, max_attempts: int,
               delay: float, now: float | None = None) -> str:
        """Apply one send's outcome; returns the new state (sent, pending, failed), or ``taken``
        when the notification's lease passed to another node (that node's outcome counts)."""
        now = time.time() if now is None else now
        state = "sent" if ok else ("failed" if attempts >= max_attempts else "pending")
        fence, mine = self.cluster.fence()
        self.cluster.let_go("notifications", [nid])
        with self.database.tx() as conn:
            if not conn.execute("UPDATE notifications SET state=?, attempts=?, last_error=?, next_attempt_at=?, "
                             f"updated_at=?, lease_owner=NULL, lease_until=NULL WHERE id=?{fence}",
                             (state, attempts, None if ok else (error or "")[:300], now + delay, now, nid,
                              *mine)).rowcount:
                return "taken"
            bump(conn, "notifications", webhook=webhook, outcome={"sent": "sent", "pending": "retry"}.get(state, state))
        return state

    def recent(self, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The newest notifications (of one state), newest first, for the console and tests."""
        cols = ("id", "webhook", "event", "state", "attempts", "last_error", "created_at", "updated_at")
        sql = f"SELECT {', '.join(cols)} FROM notifications" + (" WHERE state=?" if state else "")
        rows = self.database.query(sql + " ORDER BY id DESC LIMIT ?", (state, limit) if state else (limit,))
        return [dict(zip(cols, r)) for r in rows]

    @staticmethod
    def forget(conn: Connection, cutoff: float) -> None:
        conn.execute("DELETE FROM notifications WHERE state='sent' AND updated_at < ?", (cutoff,))

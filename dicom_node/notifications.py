"""Webhook notifications (config ``notifications:``): an outbox in the state database, a sender thread.

Why an outbox: an event is written in the same transaction as the change it reports (a study
delivered, a delivery given up, an output flagged or withheld), so a crash or a restart loses
none; a thread of its own sends them, so a slow or dead receiver never holds up receiving,
translating or delivering.  Failed sends are retried with the webhook's ``retry`` (default:
20 sends over about 8 hours), then kept as ``failed``.

Each event is an HTTP POST of JSON::

    {"event": "study.delivered", "id": 17, "time": "2026-12-02T05:55:44Z", "node": "DICOMNODE",
     "called_ae": "DR_KIM_STYLE", "route": "dr_kim_style-soft", "study_uid": "1.2...", ...}

with headers ``X-Dicom-Node-Event``, ``X-Dicom-Node-Delivery`` (the id: receivers drop
repeats) and, with a ``secret``, ``X-Dicom-Node-Signature: sha256=<HMAC-SHA256 of the body>``.
Patient name, ID and accession number are added only with ``include_phi: true``.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from dicom_node.counters import bump
from dicom_node.database import first_line

__all__ = ["NOTIFICATIONS_SCHEMA", "NotificationOutbox", "Notifier", "sign", "SIGNATURE_HEADER"]

log = logging.getLogger("dicom_node.notifications")

SIGNATURE_HEADER = "X-Dicom-Node-Signature"
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


def sign(secret: str, body: bytes) -> str:
    """The signature header's value: ``sha256=`` + hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class NotificationOutbox:
    """Mixed into :class:`dicom_node.state.StateDB`: events in, due notifications out.

    ``webhooks`` (the config's ``notifications``) and ``node_ae`` are set by the node.
    """

    webhooks: list[Any] = []
    node_ae: str = ""

    def _notify(self, c: Any, event: str, payload: dict[str, Any], study_uid: str | None = None,
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
                    row = c.execute("SELECT patient_name, patient_id, accession FROM study_info WHERE study_uid=?",
                                    (study_uid,)).fetchone()
                    phi = dict(zip(("patient_name", "patient_id", "accession_number"), row or ("", "", "")))
                body.update(phi)
            c.execute("INSERT INTO notifications (webhook, event, body, state, next_attempt_at, created_at, "
                      "updated_at) VALUES (?,?,?, 'pending', ?,?,?)", (w.name, event, json.dumps(body), now, now, now))

    def due_notifications(self, limit: int = BATCH, now: float | None = None) -> list[tuple[int, str, str, str, int]]:
        """(id, webhook, event, body, attempts) of pending notifications whose time has come."""
        now = time.time() if now is None else now
        return [tuple(r) for r in self._query(  # type: ignore[attr-defined]
            "SELECT id, webhook, event, body, attempts FROM notifications WHERE state='pending' AND next_attempt_at<=? "
            "ORDER BY id LIMIT ?", (now, int(limit)))]

    def claim_notifications(self, limit: int = BATCH, now: float | None = None) -> list[tuple[int, str, str, str, int]]:
        """Lease due notifications no node holds (as :meth:`due_notifications`): one sender each."""
        now = time.time() if now is None else now
        with self._tx() as c:  # type: ignore[attr-defined]
            ids = self._claim(c, "notifications", "state='pending' AND next_attempt_at<=?", (now,), "id",  # type: ignore
                              limit, now)
            if not ids:
                return []
            return [tuple(r) for r in c.execute(
                "SELECT id, webhook, event, body, attempts FROM notifications "
                f"WHERE id IN ({','.join('?' * len(ids))}) ORDER BY id", ids).fetchall()]

    def next_notification_time(self, now: float | None = None) -> float | None:
        """When the next notification no node holds is due."""
        now = time.time() if now is None else now
        rows = self._query("SELECT MIN(next_attempt_at) FROM notifications WHERE state='pending' AND "  # type: ignore
                           "(lease_until IS NULL OR lease_until < ?)", (now,))
        return None if rows[0][0] is None else float(rows[0][0])

    def record_notification(self, nid: int, webhook: str, ok: bool, error: str | None, attempts: int,
                            max_attempts: int, delay: float, now: float | None = None) -> str:
        """Apply one send's outcome; returns the new state (sent, pending, failed), or ``taken``
        when the notification's lease passed to another node (that node's outcome counts)."""
        now = time.time() if now is None else now
        state = "sent" if ok else ("failed" if attempts >= max_attempts else "pending")
        fence, mine = self._fence()  # type: ignore[attr-defined]
        self._let_go("notifications", [nid])  # type: ignore[attr-defined]
        with self._tx() as c:  # type: ignore[attr-defined]
            if not c.execute("UPDATE notifications SET state=?, attempts=?, last_error=?, next_attempt_at=?, "
                             f"updated_at=?, lease_owner=NULL, lease_until=NULL WHERE id=?{fence}",
                             (state, attempts, None if ok else (error or "")[:300], now + delay, now, nid,
                              *mine)).rowcount:
                return "taken"
            bump(c, "notifications", webhook=webhook, outcome={"sent": "sent", "pending": "retry"}.get(state, state))
        return state

    def notifications(self, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The newest notifications (of one state), newest first, for the console and tests."""
        cols = ("id", "webhook", "event", "state", "attempts", "last_error", "created_at", "updated_at")
        sql = f"SELECT {', '.join(cols)} FROM notifications" + (" WHERE state=?" if state else "")
        rows = self._query(sql + " ORDER BY id DESC LIMIT ?", (state, limit) if state else (limit,))  # type: ignore
        return [dict(zip(cols, r)) for r in rows]


class Notifier(threading.Thread):
    """Sends due notifications, one at a time, and records each outcome."""

    POLL_SECONDS = 0.5
    ERROR_PAUSE = 5.0  # after a failure of the state database

    def __init__(self, config: Any, db: Any, stop: threading.Event) -> None:
        super().__init__(name="notifier", daemon=True)
        self.config, self.db, self.stop_event = config, db, stop
        self.wake = threading.Event()

    def run(self) -> None:
        failing = False
        while not self.stop_event.is_set():
            self.wake.clear()
            try:
                due = self.db.claim_notifications()
                for i, row in enumerate(due):
                    if self.stop_event.is_set():
                        self.db.release_claims("notifications", [r[0] for r in due[i:]])
                        return
                    self._send(*row)
            except Exception as exc:  # noqa: BLE001 - never stop the node for a notification
                # the database is away, most likely: say so once per outage, look again in a while
                if not failing:
                    log.error("notifier: %s (retrying every %gs)", first_line(exc), self.ERROR_PAUSE)
                failing = True
                self.stop_event.wait(self.ERROR_PAUSE)
                continue
            failing = False
            if not due:
                try:
                    nxt = self.db.next_notification_time()
                except Exception:  # noqa: BLE001 - the database is away: look again later, never die
                    nxt = time.time() + 5.0
                wait = self.POLL_SECONDS if nxt is None else max(0.01, min(self.POLL_SECONDS, nxt - time.time()))
                self.wake.wait(wait)

    def _send(self, nid: int, webhook: str, event: str, body: str, attempts: int) -> None:
        hook = next((w for w in self.config.notifications if w.name == webhook), None)
        if hook is None:
            self.db.record_notification(nid, webhook, False, "webhook no longer configured", 1, 1, 0.0)
            return
        retry = hook.retry
        error = post(hook, event, nid, body.encode())
        state = self.db.record_notification(nid, webhook, error is None, error, attempts + 1, retry.max_attempts,
                                            retry.delay(attempts + 1))
        if error is None:
            log.info("webhook %s: %s #%d sent", webhook, event, nid)
        else:
            log.warning("webhook %s: %s #%d not sent (%s)%s", webhook, event, nid, error,
                        ": given up" if state == "failed" else ", will retry")


def post(hook: Any, event: str, nid: int, body: bytes) -> str | None:
    """POST ``body`` to ``hook.url``; None when the receiver answered 2xx, else why not."""
    headers = {"Content-Type": "application/json", "User-Agent": "dicom-node", "X-Dicom-Node-Event": event,
               "X-Dicom-Node-Delivery": str(nid)}
    if hook.secret:
        headers[SIGNATURE_HEADER] = sign(hook.secret, body)
    handlers: list[Any] = [urllib.request.ProxyHandler({})]
    if hook.url.startswith("https://"):
        ctx = ssl.create_default_context(cafile=str(hook.ca) if hook.ca else None)
        if not hook.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if hook.cert is not None:
            ctx.load_cert_chain(str(hook.cert), str(hook.key) if hook.key else None)
        handlers.append(urllib.request.HTTPSHandler(context=ctx))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(urllib.request.Request(hook.url, data=body, headers=headers, method="POST"),
                         timeout=hook.timeout) as r:
            return None if 200 <= r.status < 300 else f"HTTP {r.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"cannot reach {hook.url.split('?')[0]}: {reason}"[:300]

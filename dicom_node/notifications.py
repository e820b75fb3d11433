"""Webhook notifications (config ``notifications:``): sender threads for the outbox (:mod:`dicom_node.outbox`).

Why an outbox: an event is written in the same transaction as the change it reports (a study
delivered, a delivery given up, an output flagged or withheld), so a crash or a restart loses
none; a thread of its own sends them, so a slow or dead receiver never holds up receiving,
translating or delivering.  Failed sends are retried with the webhook's ``retry`` (default:
20 sends over about 8 hours), then kept as ``failed``.

Why one sender thread per webhook, and a deadline per request: a receiver that answers one
byte every few seconds, or never, must delay only its own events.  Each POST has one total
deadline (the webhook's ``timeout``: connecting, sending and the answer's head together, not
per read), and whatever goes wrong - a refused connection, TLS, an answer that is not HTTP -
is a failed attempt of that notification, retried after its backoff, with its lease released.
Errors name the receiver by scheme, host and port only: a URL's path or query may hold a token,
and the ``secret`` and ``headers`` values are never logged, stored or shown.

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
import http.client
import logging
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from dicom_node.database import first_line
from dicom_node.loops import POLL_SECONDS, Loop

if TYPE_CHECKING:
    from dicom_node.config import NodeConfig, WebhookSettings
    from dicom_node.state import StateDB

__all__ = ["Notifier", "WebhookSender", "post", "receiver", "sign", "SIGNATURE_HEADER"]

log = logging.getLogger("dicom_node.notifications")

SIGNATURE_HEADER = "X-Dicom-Node-Signature"


def sign(secret: str, body: bytes) -> str:
    """The signature header's value: ``sha256=`` + hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Notifier(Loop):
    """Keeps one :class:`WebhookSender` per configured webhook (a reload adds and retires them)
    and gives up the notifications of webhooks no longer configured."""

    SUPERVISE_SECONDS = 1.0
    JOIN_SECONDS = 2.0  # per sender at stop: one mid-POST is abandoned (daemon), its lease runs out
    logger = log
    config: NodeConfig

    def __init__(self, config: NodeConfig, db: StateDB, stop: threading.Event) -> None:
        super().__init__("notifier", stop, config=config)
        self.db = db
        self.senders: dict[str, WebhookSender] = {}
        self.error_pause = self.SUPERVISE_SECONDS

    def hook(self, name: str) -> WebhookSettings | None:
        """The webhook's settings as configured now (None: removed by a reload)."""
        return next((w for w in self.config.notifications if w.name == name), None)

    def idle_seconds(self) -> float:
        return self.SUPERVISE_SECONDS

    def step(self) -> bool:
        names = [w.name for w in self.config.notifications]
        for name in names:
            if name not in self.senders or not self.senders[name].is_alive():
                self.senders[name] = WebhookSender(self, name)
                self.senders[name].start()
        for name in [n for n in self.senders if n not in names]:
            self.senders.pop(name).retire()
        for nid, webhook, *_ in self.db.outbox.claim(others_than=names):
            self.db.outbox.record(nid, webhook, False, "webhook no longer configured", 1, 1, 0.0)
        return False

    def failed(self, exc: Exception) -> None:
        if not self.failing:  # the database is away: the senders say so too; once per outage
            log.warning("notifier: %s", first_line(exc))

    def end(self) -> None:
        for sender in self.senders.values():
            sender.join(self.JOIN_SECONDS)


class WebhookSender(Loop):
    """Sends one webhook's due notifications, one at a time, and records each outcome."""

    logger = log

    def __init__(self, notifier: Notifier, webhook: str) -> None:
        super().__init__(f"webhook-{webhook}", notifier.stop_event, threading.Event())
        self.notifier, self.webhook, self.db = notifier, webhook, notifier.db

    def step(self) -> bool:
        due = self.db.outbox.claim(webhook=self.webhook)
        try:
            while due and not self.done:
                self._send(*due[0])
                due.pop(0)
        finally:
            if due:  # stopped, retired or failed mid-batch: the rest goes back at once
                self.db.cluster.release_claims("notifications", [r[0] for r in due])
        return False  # what is due next may lie in the future: idle_seconds says when

    def idle_seconds(self) -> float:
        nxt = self.db.outbox.next_time(webhook=self.webhook)
        return POLL_SECONDS if nxt is None else max(0.01, min(POLL_SECONDS, nxt - time.time()))

    def failed(self, exc: Exception) -> None:
        # the database is away, most likely: say so once per outage, look again in a while
        if not self.failing:
            log.error("webhook %s: %s (retrying every %gs)", self.webhook, first_line(exc), self.error_pause)

    def _send(self, nid: int, webhook: str, event: str, body: str, attempts: int) -> None:
        hook = self.notifier.hook(webhook)
        if hook is None:
            self.db.outbox.record(nid, webhook, False, "webhook no longer configured", 1, 1, 0.0)
            return
        retry = hook.retry
        error = post(hook, event, nid, body.encode())
        state = self.db.outbox.record(nid, webhook, error is None, error, attempts + 1, retry.max_attempts,
                                      retry.delay(attempts + 1))
        if error is None:
            log.info("webhook %s: %s #%d sent", webhook, event, nid)
        else:
            log.warning("webhook %s: %s #%d not sent (%s)%s", webhook, event, nid, error,
                        ": given up" if state == "failed" else ", will retry")


def receiver(url: str) -> str:
    """How errors name a webhook's receiver: ``scheme://host:port`` (a path or query may hold a token)."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return "the receiver"
    host = parts.hostname or "?"
    return f"{parts.scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def _cut(conn: http.client.HTTPConnection) -> None:
    """The deadline passed: shut the socket, so a read that is waiting returns at once."""
    sock = conn.sock
    if sock is not None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's: also under TLS
        except OSError:
            pass


def post(hook: WebhookSettings, event: str, nid: int, body: bytes) -> str | None:
    """POST ``body`` to ``hook.url`` within ``hook.timeout`` seconds in all; None when the
    receiver answered 2xx, else why not (never raises: any failure is a failed attempt)."""
    headers = {**hook.headers, "Content-Type": "application/json", "User-Agent": "dicom-node",
               "X-Dicom-Node-Event": event, "X-Dicom-Node-Delivery": str(nid)}
    if hook.secret:
        headers[SIGNATURE_HEADER] = sign(hook.secret, body)
    where = receiver(hook.url)
    started = time.monotonic()
    conn: http.client.HTTPConnection | None = None
    deadline: threading.Timer | None = None
    try:
        parts = urlsplit(hook.url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.hostname
        if host is None:  # the config check refuses such a URL already
            raise ValueError("the webhook URL names no host")
        if parts.scheme == "https":
            ctx = ssl.create_default_context(cafile=str(hook.ca) if hook.ca else None)
            if not hook.verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            if hook.cert is not None:
                ctx.load_cert_chain(str(hook.cert), str(hook.key) if hook.key else None)
            conn = http.client.HTTPSConnection(host, parts.port, timeout=hook.timeout, context=ctx)
        else:
            conn = http.client.HTTPConnection(host, parts.port, timeout=hook.timeout)
        deadline = threading.Timer(hook.timeout, _cut, (conn,))
        deadline.daemon = True
        deadline.start()
        conn.request("POST", target, body, headers)
        status = conn.getresponse().status  # the body is not needed
        return None if 200 <= status < 300 else f"HTTP {status}"
    except Exception as exc:  # noqa: BLE001 - refused, TLS, not HTTP, cut at the deadline: all failed attempts
        if time.monotonic() - started >= hook.timeout:
            return f"{where}: no complete answer within {hook.timeout:g} s"
        return f"{where}: {first_line(exc)}"[:300]
    finally:
        if deadline is not None:
            deadline.cancel()
        if conn is not None:
            conn.close()

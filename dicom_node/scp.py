"""The DICOM listener: one port, many called AE titles, C-ECHO and C-STORE.

Why the handler is so small: pynetdicom runs each association in its own thread and the
C-STORE response waits for the handler, so the handler only validates, persists
(spool file + SQLite row, both durable) and wakes the worker.  It never runs a model.
Datasets are streamed to a temporary file by pynetdicom (STORE_RECV_CHUNKED_DATASET), so
a 100 MB radiograph never sits in memory, and the handler reads only the header.

What is checked and kept, and the status codes returned to the sender: :mod:`dicom_node.ingest`
(shared with STOW-RS ingest).
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from dicom_node.config import NodeConfig
from dicom_node.ingest import STATUS_CANNOT_UNDERSTAND, STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS, Ingest, storage_classes
from dicom_node.received import RefusedWhileReceiving, watch_arriving
from dicom_node.routing import ACCEPT, REJECT_CALLED_AE, association_verdict
from dicom_node.spool import Spool
from dicom_node.state import StateDB, abbreviate
from dicom_node.untrusted import escaped, install_guards, invalid_ae_title

if TYPE_CHECKING:
    from pynetdicom.transport import ThreadedAssociationServer

    from dicom_node.metrics import NodeMetrics

__all__ = ["StoreSCP", "STATUS_OUT_OF_RESOURCES", "STATUS_CANNOT_UNDERSTAND"]

log = logging.getLogger("dicom_node.scp")

# What peers may send us per PDU.  Measured with a 200 MB instance: unlimited (0) made the
# sender put it in ONE PDU that pynetdicom holds in memory several times (peak RSS +790 MB,
# 4.5 s); 256 KiB streams it to disk in 1.4 s with no RSS growth (16 KiB default: 2.3 s).
MAX_PDU_BYTES = 256 * 1024


class StoreSCP:
    """Builds the pynetdicom AE from the config and serves it in the background."""

    def __init__(self, config: NodeConfig, spool: Spool, db: StateDB, on_received: Callable[[], None],
                 metrics: NodeMetrics | None = None, ingest: Ingest | None = None) -> None:
        self.config = config
        self.spool = spool
        self.db = db
        self.metrics = metrics
        # the store path, shared with STOW-RS ingest when the node passes its own
        self.ingest = ingest or Ingest(config, spool, db, on_received)
        self._server: ThreadedAssociationServer | None = None
        self._sessions: dict[int, _Session] = {}  # per association, for the association log
        self._sessions_lock = threading.Lock()

    def configure(self, config: NodeConfig) -> None:
        """Take a reloaded config: routes, called AE titles, allow-lists and storage limits apply
        to the next association and the next instance (listener settings need a restart)."""
        self.ingest.configure(config)
        self.config = config

    @property
    def listening(self) -> bool:
        return self._server is not None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> tuple[str, int]:
        """Start listening (non-blocking); returns the bound (host, port)."""
        from pynetdicom import (
            AE,
            ALL_TRANSFER_SYNTAXES,
            VerificationPresentationContexts,
            _config,
            evt,
        )
        from pynetdicom.events import EventHandlerType

        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.LOG_REQUEST_IDENTIFIERS = False  # pynetdicom would log patient identifiers otherwise
        install_guards()  # peer-chosen AE title bytes: rejected by us, logged escaped on one line
        node = self.config.node
        ae = AE(ae_title=node.ae_title)
        ae.require_called_aet = False  # many called AE titles on one port; checked in _on_requested
        ae.maximum_associations = node.max_associations
        ae.network_timeout = node.network_timeout
        ae.dimse_timeout = node.dimse_timeout
        ae.acse_timeout = node.acse_timeout
        ae.maximum_pdu_size = MAX_PDU_BYTES
        verification = [str(cx.abstract_syntax) for cx in VerificationPresentationContexts if cx.abstract_syntax]
        for sop_class in [*storage_classes(), *verification]:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        ssl_context = None
        if node.tls is not None:
            from dicom_node.tls import server_context

            ssl_context = server_context(node.tls)
        handlers: list[EventHandlerType] = [(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_RELEASED, self._on_ended), (evt.EVT_ABORTED, self._on_ended),
                    (evt.EVT_CONN_OPEN, self._on_opened), (evt.EVT_CONN_CLOSE, self._on_closed),
                    (evt.EVT_PDU_RECV, self._on_pdu)]
        try:
            server = ae.start_server((node.host, node.port), block=False, evt_handlers=handlers,
                                     ssl_context=ssl_context)
        except OSError as exc:
            from dicom_node.errors import UserError

            raise UserError(f"cannot listen on {node.host}:{node.port}: {exc.strerror or exc}") from None
        assert server is not None  # block=False: pynetdicom returns the server it started
        self._server = server
        if ssl_context is not None:
            _handshake_in_association_thread(server, ssl_context)
        host, port = server.server_address[:2]
        log.info("listening on %s:%d (%s, %d routes, called AEs %s)", host, port,
                 "TLS" if ssl_context else "plain", len(self.config.routes),
                 ",".join(sorted({r.called_ae for r in self.config.routes})))
        return host, port

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting; give associations in progress ``grace`` seconds, then abort them.

        An instance is acknowledged only after it is durable, so an aborted association
        loses nothing acknowledged: the sender sees a failure and sends again.
        """
        if self._server is None:
            return
        server, self._server = self._server, None
        ae = server.ae
        server.shutdown()
        deadline = time.monotonic() + grace
        while ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in ae.active_associations:
            assoc.abort()

    # -- association negotiation -------------------------------------------------------
    def _on_opened(self, event: Any) -> None:
        """A new connection gets ``node.request_timeout`` seconds to ask for an association.

        Why: pynetdicom counts a connection against ``max_associations`` from the moment it is
        accepted and waits ``acse_timeout`` (30 s) for its A-ASSOCIATE-RQ, so a few silent
        sockets locked every real sender out.  The longer ACSE timeout is restored once the
        request arrived (:meth:`_on_requested`).  Runs before the association's thread starts.
        """
        event.assoc.acse_timeout = self.config.node.request_timeout

    def _on_requested(self, event: Any) -> None:
        event.assoc.acse_timeout = self.config.node.acse_timeout
        prim = event.assoc.requestor.primitive
        called, calling = str(prim.called_ae_title).strip(), str(prim.calling_ae_title).strip()
        peer = f"{event.assoc.requestor.address}:{event.assoc.requestor.port}"
        bad_called, bad_calling = invalid_ae_title(called), invalid_ae_title(calling)
        if bad_called or bad_calling:
            # Never stored or logged raw: the association log gets the escaped titles too.
            verdict = f"invalid {'called' if bad_called else 'calling'} AE title ({bad_called or bad_calling})"
            called, calling = escaped(called), escaped(calling)
            reason = 0x07 if bad_called else 0x03
        else:
            verdict = association_verdict(self.config.routes, called, calling)
            reason = 0x07 if verdict == REJECT_CALLED_AE else 0x03
        with self._sessions_lock:
            self._sessions[id(event.assoc)] = _Session(calling, called, peer, time.time())
        if verdict == ACCEPT:
            return
        self._session(event).outcome, self._session(event).reason = "rejected", verdict
        log.warning("association rejected: %s (called %s, calling %s, from %s)", verdict, called, calling, peer)
        event.assoc.acse.send_reject(0x01, 0x01, reason)
        # As pynetdicom's own rejection does: wait until the DUL has sent the A-ASSOCIATE-RJ,
        # otherwise the socket may close first and the peer sees an abort instead.
        event.assoc.kill()

    # -- the association log ----------------------------------------------------------
    def _session(self, event: Any) -> "_Session":
        with self._sessions_lock:
            return self._sessions.setdefault(id(event.assoc), _Session("", "", "", time.time()))

    def _on_ended(self, event: Any) -> None:
        session = self._session(event)
        if session.outcome is None:
            session.outcome = "released" if event.event.name == "EVT_RELEASED" else "aborted"

    def _on_closed(self, event: Any) -> None:
        """The connection is gone: one row in the association log (after the last answer)."""
        with self._sessions_lock:
            session = self._sessions.pop(id(event.assoc), None)
        if session is None or not session.called:
            # A connection closed before it asked for an association (a port probe, a silent
            # peer giving up): pynetdicom's acceptor would keep waiting for the request until
            # request_timeout, holding a max_associations slot.  An empty item on its queue
            # ends that wait now (it reads as "no request": the thread tidies up and ends).
            if getattr(event.assoc.requestor, "primitive", None) is None:
                event.assoc.dul.to_user_queue.put(None)
            return
        try:
            self.db.operations.record_association(
                calling_ae=session.calling, called_ae=session.called, peer=session.peer, stored=session.stored,
                refused=session.refused, started_at=session.started, outcome=session.outcome or "aborted",
                reason=session.reason or (None if session.outcome else "connection closed without release"))
        except Exception as exc:  # noqa: BLE001 - the log must never disturb receiving
            log.error("association log not written: %s: %s", exc.__class__.__name__, exc)

    # -- C-STORE -----------------------------------------------------------------------
    def _on_pdu(self, event: Any) -> None:
        """While a data set arrives: node.max_instance_bytes and storage.min_free_bytes (see
        :func:`dicom_node.received.watch_arriving`); the handler then answers 0xA700."""
        dimse = getattr(event.assoc, "dimse", None)
        message = getattr(dimse, "message", None)
        if message is None:
            return
        config = self.config
        why = watch_arriving(message, max_bytes=config.node.max_instance_bytes, free_bytes=self.spool.free_bytes,
                             min_free=config.storage.min_free_bytes)
        if why:
            log.warning("receiving stopped: %s; the rest of this instance is dropped", why)

    def _on_store(self, event: Any) -> int:
        t0 = time.perf_counter()
        status = self._on_store_status(event)
        session = self._session(event)
        if status == STATUS_SUCCESS:
            session.stored += 1
        else:
            session.refused += 1
        if self.metrics is not None:
            self.metrics.cstore_seconds.observe(time.perf_counter() - t0)
        return status

    def _on_store_status(self, event: Any) -> int:
        prim = event.assoc.requestor.primitive
        called, calling = str(prim.called_ae_title).strip(), str(prim.calling_ae_title).strip()
        req = event.request
        refused = getattr(req, "_dataset_file", None)
        if isinstance(refused, RefusedWhileReceiving):
            log.warning("store refused (0xA700): %s (sop %s, from %s to %s)", refused.reason,
                        abbreviate(str(req.AffectedSOPInstanceUID or "")), calling, called)
            return STATUS_OUT_OF_RESOURCES
        try:
            src = Path(event.dataset_path)
        except AttributeError:
            log.error("store refused: no dataset file (chunked receive disabled?)")
            return STATUS_OUT_OF_RESOURCES
        return self.ingest.store(src, called, calling, affected_sop=str(req.AffectedSOPInstanceUID or ""),
                                 affected_class=str(req.AffectedSOPClassUID or ""), protocol="dimse")


def _handshake_in_association_thread(server: Any, ssl_context: ssl.SSLContext) -> None:
    """TLS handshakes happen in each association's own thread, not in the accept loop.

    Why: pynetdicom wraps each accepted socket with the handshake done at once, in the one
    thread that accepts every connection, and without a timeout: a single TCP connection that
    never speaks stopped the TLS listener for everyone (measured: a real sender waited out its
    own 15 s timeout).  Wrapped without the handshake, OpenSSL performs it on the first read,
    in the association's thread, under node.request_timeout like any silent connection.
    ``server`` (pynetdicom's ThreadedAssociationServer) is Any here: its socketserver method
    ``get_request`` is replaced on this one object, which a typed method may not be.
    """

    def get_request() -> tuple[socket.socket, Any]:
        sock, address = server.socket.accept()
        return ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address

    server.get_request = get_request


class _Session:
    """One association, for the association log: who, from where, how many, how it ended."""

    def __init__(self, calling: str, called: str, peer: str, started: float) -> None:
        self.calling, self.called, self.peer, self.started = calling, called, peer, started
        self.stored = self.refused = 0
        self.outcome: str | None = None  # released | aborted | rejected
        self.reason: str | None = None


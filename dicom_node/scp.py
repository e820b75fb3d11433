"""The DICOM listener: one port, many called AE titles, C-ECHO and C-STORE.

Why the handler is so small: pynetdicom runs each association in its own thread and the
C-STORE response waits for the handler, so the handler only validates, persists
(spool file + SQLite row, both durable) and wakes the worker.  It never runs a model.
Datasets are streamed to a temporary file by pynetdicom (STORE_RECV_CHUNKED_DATASET), so
a 100 MB radiograph never sits in memory, and the handler reads only the header.

Status codes returned to the sender:
  0x0000 success (also for a duplicate SOP Instance UID: idempotent)
  0xA700 out of resources: disk below storage.min_free_bytes, instance larger than
         node.max_instance_bytes, or any write error (the sender should retry later)
  0xC000 cannot understand: unparsable dataset, missing/invalid UIDs, or UIDs that
         contradict the C-STORE command
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

from dicom_node.config import NodeConfig
from dicom_node.received import (IMAGE_SIZE_KEYWORDS, RefusedWhileReceiving, budget_problem, content_digest,
                                 read_header, watch_arriving)
from dicom_node.routing import ACCEPT, REJECT_CALLED_AE, association_verdict, fallback_route, match_keywords, select_route
from dicom_node.spool import Spool
from dicom_node.state import STUDY_INFO_KEYWORDS, StateDB, abbreviate
from dicom_node.untrusted import escaped, install_guards, invalid_ae_title

__all__ = ["StoreSCP", "STATUS_OUT_OF_RESOURCES", "STATUS_CANNOT_UNDERSTAND"]

log = logging.getLogger("dicom_node.scp")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000

# What peers may send us per PDU.  Measured with a 200 MB instance: unlimited (0) made the
# sender put it in ONE PDU that pynetdicom holds in memory several times (peak RSS +790 MB,
# 4.5 s); 256 KiB streams it to disk in 1.4 s with no RSS growth (16 KiB default: 2.3 s).
MAX_PDU_BYTES = 256 * 1024

_HEADER_KEYWORDS = {"SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
                    *IMAGE_SIZE_KEYWORDS}


class StoreSCP:
    """Builds the pynetdicom AE from the config and serves it in the background."""

    def __init__(self, config: NodeConfig, spool: Spool, db: StateDB, on_received: Callable[[], None],
                 metrics: Any = None) -> None:
        self.config = config
        self.spool = spool
        self.db = db
        self.on_received = on_received
        self.metrics = metrics  # dicom_node.metrics.NodeMetrics, or None
        self._server: Any = None
        self._keywords = _HEADER_KEYWORDS | set(STUDY_INFO_KEYWORDS) | match_keywords(config.routes)
        self._write_lock = threading.Lock()  # serialises free-space check + write across associations
        self._sessions: dict[int, _Session] = {}  # per association, for the association log
        self._sessions_lock = threading.Lock()

    def configure(self, config: NodeConfig) -> None:
        """Take a reloaded config: routes, called AE titles, allow-lists and storage limits apply
        to the next association and the next instance (listener settings need a restart)."""
        self._keywords = _HEADER_KEYWORDS | set(STUDY_INFO_KEYWORDS) | match_keywords(config.routes)
        self.config = config

    @property
    def listening(self) -> bool:
        return self._server is not None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> tuple[str, int]:
        """Start listening (non-blocking); returns the bound (host, port)."""
        from pynetdicom import (ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, _config, evt)
        from pynetdicom.sop_class import Verification

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
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        ssl_context = None
        if node.tls is not None:
            from dicom_node.tls import server_context

            ssl_context = server_context(node.tls)
        handlers = [(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_RELEASED, self._on_ended), (evt.EVT_ABORTED, self._on_ended),
                    (evt.EVT_CONN_OPEN, self._on_opened), (evt.EVT_CONN_CLOSE, self._on_closed),
                    (evt.EVT_PDU_RECV, self._on_pdu)]
        try:
            self._server = ae.start_server((node.host, node.port), block=False, evt_handlers=handlers,
                                           ssl_context=ssl_context)
        except OSError as exc:
            from dicom_node.errors import UserError

            raise UserError(f"cannot listen on {node.host}:{node.port}: {exc.strerror or exc}") from None
        if ssl_context is not None:
            _handshake_in_association_thread(self._server, ssl_context)
        host, port = self._server.server_address[:2]
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
        try:
            return self._store(src, called, calling, str(req.AffectedSOPInstanceUID or ""),
                               str(req.AffectedSOPClassUID or ""))
        except Exception as exc:  # noqa: BLE001 - never success when we could not persist
            from dicom_node.database import first_line, is_unavailable

            if is_unavailable(exc):
                log.error("store refused (0xA700): the state database is unavailable (%s)", first_line(exc))
            else:
                log.exception("store failed unexpectedly (called %s, calling %s)", called, calling)
            return STATUS_OUT_OF_RESOURCES

    def _store(self, src: Path, called: str, calling: str, affected_sop: str, affected_class: str) -> int:
        config = self.config  # one config for the whole instance, even if a reload swaps it meanwhile
        size = src.stat().st_size
        limit = config.node.max_instance_bytes
        if limit and size > limit:
            log.warning("store refused: %d bytes > max_instance_bytes %d (sop %s)", size, limit,
                        abbreviate(affected_sop))
            return STATUS_OUT_OF_RESOURCES
        try:
            inflated = self._inflate_if_deflated(src, config)
        except OSError as exc:
            log.warning("store refused: %s (sop %s, from %s to %s)", exc.strerror or exc, abbreviate(affected_sop),
                        calling, called)
            return STATUS_OUT_OF_RESOURCES
        except ValueError as exc:
            log.warning("store refused: %s (sop %s, from %s to %s)", exc, abbreviate(affected_sop), calling, called)
            return STATUS_CANNOT_UNDERSTAND
        if inflated is None:
            return self._store_file(config, src, called, calling, affected_sop, affected_class)
        try:
            return self._store_file(config, inflated, called, calling, affected_sop, affected_class)
        finally:
            inflated.unlink(missing_ok=True)  # gone already when it was adopted into the spool

    def _inflate_if_deflated(self, src: Path, config: NodeConfig) -> Path | None:
        """The inflated copy of a Deflated Explicit VR Little Endian data set (a temp file the
        caller removes), None for any other transfer syntax.  It is what is checked and kept:
        its offsets and size are those of the data set, not of the compressed bytes, and the
        worker never inflates anything in memory."""
        from pydicom.uid import DeflatedExplicitVRLittleEndian
        from pynetdicom.dsutils import split_dataset

        try:
            meta, offset = split_dataset(src)
        except Exception:  # noqa: BLE001 - judged by the full parse in _read_header
            return None
        if str(meta.get("TransferSyntaxUID", "")).strip() != DeflatedExplicitVRLittleEndian:
            return None
        return self.spool.inflate(src, offset, meta, max_bytes=config.node.max_instance_bytes or (1 << 62),
                                  min_free=config.storage.min_free_bytes)

    def _keep(self, config: NodeConfig, src: Path, size: int, final: Path, attrs: dict[str, Any],
              to_translate: bool) -> int | None:
        """Move a checked data set into the spool at ``final``; None, or the failure status."""
        sop_uid = attrs["SOPInstanceUID"]
        too_big = budget_problem(attrs, config.node.max_decode_bytes) if to_translate else None
        if too_big:  # to be translated, but it would starve every other image: say so now
            log.warning("store refused (0xA700): %s (sop %s)", too_big, abbreviate(sop_uid))
            return STATUS_OUT_OF_RESOURCES
        with self._write_lock:
            free = self.spool.free_bytes()
            if free - size < config.storage.min_free_bytes:
                log.error("store refused: disk full (%d bytes free, min_free_bytes %d) sop %s", free,
                          config.storage.min_free_bytes, abbreviate(sop_uid))
                return STATUS_OUT_OF_RESOURCES
            try:
                self.spool.adopt_file(src, final)
            except OSError as exc:
                log.error("store refused: cannot write spool (%s) sop %s", exc.strerror or exc, abbreviate(sop_uid))
                return STATUS_OUT_OF_RESOURCES
        return None

    def _store_revision(self, config: NodeConfig, src: Path, size: int, digest: str, existing: Any,
                        attrs: dict[str, Any], called: str, calling: str) -> int:
        """A known SOP Instance UID with other content (a corrected resend): processed again.

        Why not a duplicate: a modality that corrects demographics resends the same instance;
        acknowledging and ignoring it left the PACS with the wrong name on the restyled image.
        The new output keeps its UIDs (derived from the source UIDs), so the PACS replaces it.
        """
        choice = select_route(config.routes, called, calling, attrs)
        final = self.spool.original_path(called, existing.sop_uid)
        translated = existing.route is not None and existing.state != "unmatched"
        refused = self._keep(config, src, size, final, attrs, translated)
        if refused is not None:
            return refused
        fallback = fallback_route(config.routes, choice)
        revision = self.db.record_revision(existing.id, calling_ae=calling, path=str(final), size=size,
                                           content_sha256=digest,
                                           forward=list(fallback.destinations) if fallback else [])
        log.info("sop %s to %s resent with other content: processed again (revision %d; it was %s)",
                 abbreviate(existing.sop_uid), called, revision, existing.state)
        self.on_received()
        return STATUS_SUCCESS

    def _store_file(self, config: NodeConfig, src: Path, called: str, calling: str, affected_sop: str,
                    affected_class: str) -> int:
        """Check, keep and record one received data set (uncompressed or inflated) at ``src``."""
        size = src.stat().st_size
        attrs, problem = read_header(src, self._keywords, affected_sop, affected_class)
        if problem:
            log.warning("store refused: %s (sop %s, from %s to %s)", problem, abbreviate(affected_sop), calling, called)
            return STATUS_CANNOT_UNDERSTAND
        sop_uid = attrs["SOPInstanceUID"]
        digest = content_digest(src)
        existing = self.db.find_instance(called, sop_uid)
        if existing is not None and self.db.content_digest(existing.id) not in (None, digest):
            return self._store_revision(config, src, size, digest, existing, attrs, called, calling)
        if existing is not None:
            self.db.record_received(called_ae=called, calling_ae=calling, sop_uid=sop_uid,
                                    sop_class=attrs["SOPClassUID"], study_uid=attrs["StudyInstanceUID"],
                                    series_uid=attrs["SeriesInstanceUID"], route=existing.route, matched=True,
                                    path=existing.path, size=existing.size)
            log.info("duplicate sop %s to %s acknowledged (state %s)", abbreviate(sop_uid), called, existing.state)
            return STATUS_SUCCESS
        choice = select_route(config.routes, called, calling, attrs)
        final = self.spool.original_path(called, sop_uid)
        refused = self._keep(config, src, size, final, attrs, choice.matched)
        if refused is not None:
            return refused
        fallback = fallback_route(config.routes, choice)
        forward = list(fallback.destinations) if fallback else []
        _, new = self.db.record_received(
            called_ae=called, calling_ae=calling, sop_uid=sop_uid, sop_class=attrs["SOPClassUID"],
            study_uid=attrs["StudyInstanceUID"], series_uid=attrs["SeriesInstanceUID"],
            route=None if choice.index is None else config.routes[choice.index].name,
            matched=choice.matched, path=str(final), size=size, forward=forward, content_sha256=digest,
            study={col: _text(attrs.get(kw)) for kw, col in STUDY_INFO_KEYWORDS.items()})
        if choice.matched:
            log.info("received sop %s study %s %s from %s to %s (route %s, %d bytes)", abbreviate(sop_uid),
                     abbreviate(attrs["StudyInstanceUID"]), attrs.get("Modality") or "-", calling, called,
                     config.routes[choice.index].name, size)
        else:
            log.info("received sop %s %s from %s to %s: no route matches, kept%s", abbreviate(sop_uid),
                     attrs.get("Modality") or "-", calling, called,
                     f", forwarding original to {','.join(forward)}" if forward else " (not forwarded)")
        self.on_received()
        return STATUS_SUCCESS

def _handshake_in_association_thread(server: Any, ssl_context: Any) -> None:
    """TLS handshakes happen in each association's own thread, not in the accept loop.

    Why: pynetdicom wraps each accepted socket with the handshake done at once, in the one
    thread that accepts every connection, and without a timeout: a single TCP connection that
    never speaks stopped the TLS listener for everyone (measured: a real sender waited out its
    own 15 s timeout).  Wrapped without the handshake, OpenSSL performs it on the first read,
    in the association's thread, under node.request_timeout like any silent connection.
    """

    def get_request() -> tuple[Any, Any]:
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


def _text(value: Any) -> str:
    """A header value as plain text (a PersonName as its DICOM form, multi-values joined)."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or value.__class__.__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()

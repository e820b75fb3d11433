"""STOW-RS ingest (DICOMweb, PS3.18 10.5): ``POST /dicomweb/{called_ae}/studies`` on the web server.

The path names the route as a called AE title does for a C-STORE, and every instance takes the
same store path as a C-STORE (:class:`dicom_node.ingest.Ingest`): durable on the spool and
committed in the state database before the answer, under the same size, pixel and decode limits,
refused with the same status codes, which STOW-RS reports as each failed instance's
``FailureReason`` (0xA700 out of resources, 0xC000 cannot understand, 0x0122 SOP class not
supported: what the listener would not have negotiated).  The sender of a STOW-RS instance is
recorded with the calling AE title :data:`CALLING_AE`, so a route's ``calling_ae`` allow-list
takes STOW-RS instances only when it names it; a route's ``stow_rs_clients`` narrows that to
named clients (a token's name in ``web.stow_rs.tokens``, a certificate's subject), logged.

Off unless ``web.stow_rs`` is configured: ``tokens`` (Argon2id hashes; the client sends
``Authorization: Bearer TOKEN``) and/or ``client_ca`` (with web.tls: a client certificate that CA
signed, its subject in ``subjects`` when that is set, needs no token; :mod:`.client_certs`,
:func:`client_subject`).  A token is verified with Argon2 once (a few at a time, shared with the
console's logins: :class:`dicom_node.web.auth.BearerTokens`) and then known by an HMAC of it for
as long as the node runs and the configured hashes stay the same; wrong tokens are limited per
client address as wrong logins are.

Answers: 200 and a ``ReferencedSOPSequence`` when every instance was stored; 202 with a
``FailedSOPSequence`` when some failed; 409 when all failed (``application/dicom+json``);
401 without or with a wrong token (and no allowed certificate), 404 for a called AE title no
route has (or STOW-RS off), 403 when no route of it allows :data:`CALLING_AE`, a route of it has
``stow_rs_clients`` without this client, or a client certificate's subject is not in
``subjects`` (and no token came), 415 for a request that is not
``multipart/related; type="application/dicom"``, 406 when the Accept header rules out
``application/dicom+json`` (:func:`dicom_node.web.media_types.accepts_json`), 400 for a malformed multipart body, 408 when
the body stops arriving for ``node.network_timeout`` seconds.

Why the whole body is read before anything is stored: a body cut short or malformed must store
nothing (a half-stored request the client cannot tell from a failed one would be sent again
anyway, but the study would start its quiet period with a part of its instances).  Each part is
streamed to a file in the spool's temp folder as it arrives, under the C-STORE's limits
(:class:`dicom_node.received.ArrivalWatch`: ``node.max_instance_bytes``, ``storage.min_free_bytes``),
so memory holds at most :data:`FEED_BYTES` per request whatever the body's size.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Mapping

from dicom_node.ingest import STATUS_CANNOT_UNDERSTAND, STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS, storage_classes
from dicom_node.received import ArrivalWatch
from dicom_node.routing import REJECT_CALLED_AE, REJECT_CALLING_AE, association_verdict, stow_rs_unlisted
from dicom_node.untrusted import invalid_ae_title
from dicom_node.web.auth import BearerTokens, HashTurns, LoginLimiter
from dicom_node.web.media_types import DICOM_JSON, accepts_json, content_type

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from dicom_node.config import NodeConfig, WebSettings
    from dicom_node.web.app import Console

__all__ = ["stow_endpoint", "receiving", "CALLING_AE", "PATH", "STATUS_SOP_CLASS_NOT_SUPPORTED", "client_subject",
           "FEED_BYTES", "MAX_TOKEN_LENGTH"]

log = logging.getLogger("dicom_node.web.stow")

PATH = "/dicomweb/{called_ae}/studies"
CALLING_AE = "STOW-RS"  # the sender of a STOW-RS instance, for routes' calling_ae allow-lists and the logs
DICOM_TYPE = "application/dicom"
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122
FEED_BYTES = 1 << 20  # body bytes collected in memory before the parser writes them to disk (in a thread)
PREAMBLE_BYTES = 64 * 1024  # what may come before the first boundary (RFC 2046 preamble)
MAX_TOKEN_LENGTH = 4096  # longer bearer tokens are wrong without hashing them


class Malformed(ValueError):
    """The body is not a complete multipart/related body: 400, nothing stored."""


@dataclass
class _Part:
    """One body part on its way to disk."""

    headers: dict[str, str] = field(default_factory=dict)
    path: Path | None = None
    file: IO[bytes] | None = None
    size: int = 0
    refused: str | None = None  # why it was dropped while arriving (0xA700)
    uids: tuple[str, str] = ("", "")  # (SOP class, instance) of a refused part, read before it was dropped

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", DICOM_TYPE).split(";")[0].strip().lower()


class _BodyParts:
    """Feeds a multipart/related body to ``python_multipart``'s parser and writes each part to a
    temp file in ``tmp`` (called in a worker thread, one chunk after the other)."""

    def __init__(self, boundary: str, tmp: Path, watch: Callable[[], ArrivalWatch]) -> None:
        from python_multipart.multipart import MultipartParser

        self.tmp, self.watch = tmp, watch
        self.parts: list[_Part] = []
        self.ended = False
        self._delimiter = b"--" + boundary.encode("latin-1")
        self._preamble: bytearray | None = bytearray()  # None once the first boundary was seen
        self._field = bytearray()
        self._value = bytearray()
        self._watch: ArrivalWatch | None = None
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._data,
            "on_part_end": self._end_part, "on_end": self._end})

    def feed(self, data: bytes) -> None:
        from python_multipart.exceptions import MultipartParseError

        if self._preamble is not None:  # skip a preamble up to the first boundary
            self._preamble += data
            at = self._preamble.find(self._delimiter)
            if at < 0:
                if len(self._preamble) > PREAMBLE_BYTES:
                    raise Malformed("no multipart boundary at the start of the body")
                return
            data, self._preamble = bytes(self._preamble[at:]), None
        if self.ended:
            return  # the epilogue after the closing boundary
        try:
            self.parser.write(data)
        except MultipartParseError as exc:
            raise Malformed(f"malformed multipart body ({str(exc).split(' at index')[0]})") from None

    def finish(self) -> None:
        if not self.ended:
            raise Malformed("the multipart body ends before its closing boundary")
        if not self.parts:
            raise Malformed("the multipart body has no parts")

    def discard(self) -> None:
        """Remove every temp file (after an error, or once each part was stored or refused)."""
        for part in self.parts:
            try:
                if part.file is not None:
                    part.file.close()
            except OSError:
                pass
            if part.path is not None:
                part.path.unlink(missing_ok=True)

    # -- parser callbacks --------------------------------------------------------------
    def _begin(self) -> None:
        self.parts.append(_Part())

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        name = bytes(self._field).decode("latin-1").strip().lower()
        self.parts[-1].headers[name] = bytes(self._value).decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        part = self.parts[-1]
        self._watch = self.watch()
        try:
            fd, name = tempfile.mkstemp(prefix="stow-", suffix=".dcm", dir=self.tmp)  # 0600
        except OSError as exc:
            part.refused = f"cannot write the spool ({exc.strerror or exc})"
            return
        part.path, part.file = Path(name), os.fdopen(fd, "wb")

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self.parts[-1]
        if part.refused is not None:
            return  # dropped: the rest of it is read and not kept
        assert part.file is not None  # made when its headers ended, else it was refused there
        part.size += end - start
        try:
            part.file.write(data[start:end])  # at most FEED_BYTES past a limit, dropped at once
            why = self._watch.problem(part.size) if self._watch is not None else None
        except OSError as exc:  # the disk filled up faster than the watch looked
            why = f"cannot write the spool ({exc.strerror or exc})"
        if why is not None:
            part.refused = why
            try:
                part.file.flush()
                part.uids = _uids(part.path) if part.path is not None else ("", "")  # its header arrived: the answer names the instance
                part.file.truncate(0)
                part.file.close()
            except OSError:
                pass  # removed with the others at the end of the request
            part.file = None

    def _end_part(self) -> None:
        part = self.parts[-1]
        if part.file is not None:
            try:
                part.file.close()
            except OSError as exc:  # its last bytes did not fit on the disk
                part.refused = f"cannot write the spool ({exc.strerror or exc})"
            part.file = None

    def _end(self) -> None:
        self.ended = True


async def _chunks(request: Request, idle: float) -> AsyncIterator[bytes]:
    """The request body's chunks; TimeoutError when none arrives for ``idle`` seconds.

    Why: a client that stops sending mid-body (gone without a FIN, or trickling on purpose)
    would hold its temp files and a worker forever; node.network_timeout is what the DICOM
    listener allows a silent peer too."""
    import anyio

    stream = request.stream()
    while True:
        with anyio.fail_after(idle):
            try:
                chunk = await stream.__anext__()
            except StopAsyncIteration:
                return
        yield chunk


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _uids(path: Path) -> tuple[str, str]:
    """(SOP Class UID, SOP Instance UID) of a part, as far as it can be read: for its item in
    the response (a part that cannot be read at all is reported with empty UIDs)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, defer_size=1024,
                             specific_tags=["SOPClassUID", "SOPInstanceUID"])
        return str(ds.get("SOPClassUID") or "").strip(), str(ds.get("SOPInstanceUID") or "").strip()
    except Exception:  # noqa: BLE001 - unreadable: the store path says 0xC000
        return "", ""


def client_subject(scope: Mapping[str, Any]) -> str | None:
    """The RFC 4514 subject of the request's client certificate, from the ASGI TLS extension
    (:mod:`.client_certs`: only a certificate the handshake verified is there); None: none."""
    tls = (scope.get("extensions") or {}).get("tls") or {}
    if tls.get("client_cert_error") or not tls.get("client_cert_chain"):
        return None
    return tls.get("client_cert_name")


def _store_parts(console: Console, called: str, parts: list[_Part]) -> tuple[list[tuple[str, str]],
                                                                          list[tuple[str, str, int]]]:
    """Each part through the store path (in a worker thread): (stored, failed) as
    [(sop class, sop instance)] and [(sop class, sop instance, failure reason)]."""
    stored: list[tuple[str, str]] = []
    failed: list[tuple[str, str, int]] = []
    supported = frozenset(storage_classes())
    ingest = console.ingest
    assert ingest is not None  # endpoint() answers 404 on a node that does not receive
    for part in parts:
        sop_class, sop_uid = part.uids if part.refused is not None or part.path is None else _uids(part.path)
        if part.refused is not None:
            log.warning("STOW-RS part refused (0xA700): %s (to %s)", part.refused, called)
            status = STATUS_OUT_OF_RESOURCES
        elif part.content_type != DICOM_TYPE:
            log.warning("STOW-RS part refused (0xC000): content type %r, not %s (to %s)", part.content_type[:60],
                        DICOM_TYPE, called)
            status = STATUS_CANNOT_UNDERSTAND
        elif sop_class and sop_class not in supported:
            log.warning("STOW-RS part refused (0x0122): SOP class %s is not a storage SOP class the node takes "
                        "(to %s)", sop_class[:64], called)
            status = STATUS_SOP_CLASS_NOT_SUPPORTED
        else:
            # the part's own SOP Instance UID stands for the C-STORE request's (the same file: for the log)
            assert part.path is not None  # a part without a file was refused when its headers ended
            status = ingest.store(part.path, called, CALLING_AE, affected_sop=sop_uid, protocol="stow-rs")
        if part.path is not None:
            part.path.unlink(missing_ok=True)  # moved into the spool when it was kept
        if status == STATUS_SUCCESS:
            stored.append((sop_class, sop_uid))
        else:
            failed.append((sop_class, sop_uid, status))
    return stored, failed


def _response(stored: list[tuple[str, str]], failed: list[tuple[str, str, int]]) -> Response:
    """The Store Instances Response (PS3.18 10.5.3) as DICOM JSON."""
    import json

    from pydicom import Dataset
    from starlette.responses import Response

    ds = Dataset()
    ds.ReferencedSOPSequence = []
    for sop_class, sop_uid in stored:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_uid
        ds.ReferencedSOPSequence.append(item)
    if failed:
        ds.FailedSOPSequence = []
        for sop_class, sop_uid, reason in failed:
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_uid
            item.FailureReason = reason
            ds.FailedSOPSequence.append(item)
    status = 200 if not failed else 202 if stored else 409
    return Response(json.dumps(ds.to_json_dict()), status_code=status, media_type=DICOM_JSON)


def receiving(config: NodeConfig, counters: dict[str, list[tuple[dict[str, str], int]]]) -> list[dict[str, Any]]:
    """Per called AE title: the STOW-RS path it takes (None: STOW-RS off) and the instances it
    received over each protocol (``counters``: ``StateDB.counters.values()``), for the console."""
    from urllib.parse import quote

    from dicom_node.metrics import received_by_protocol

    counts = received_by_protocol(counters)
    routed = {r.called_ae for r in config.routes}
    stow = config.web is not None and config.web.stow_rs_tokens is not None
    return [{"called_ae": ae, "routed": ae in routed, "dimse": counts.get(ae, {}).get("dimse", 0),
             "stow_rs": counts.get(ae, {}).get("stow-rs", 0),
             "stow_path": PATH.format(called_ae=quote(ae, safe="")) if stow and ae in routed else None}
            for ae in sorted(routed | set(counts))]


def stow_endpoint(console: Console, turns: HashTurns,
                  client_of: Callable[[Request], str]) -> Callable[[Request], Awaitable[Response]]:
    """The Starlette endpoint of ``POST`` :data:`PATH` for the node behind ``console``
    (a :class:`dicom_node.web.app.Console`); ``client_of``: who a request comes from."""
    import anyio
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import ClientDisconnect

    tokens = BearerTokens(turns)
    limiter = LoginLimiter()

    async def authorized(request: Request, web: WebSettings) -> tuple[Response | None, str]:
        """(None, who: a certificate's subject, a token's name, "" for a token of a list) for a configured
        token or an allowed client certificate (:mod:`.client_certs`), else (the response to give, "")."""
        challenge = {"www-authenticate": 'Bearer realm="dicom-node STOW-RS"'}
        subject = client_subject(request.scope) if web.stow_rs_client_ca is not None else None
        if subject is not None and (web.stow_rs_subjects is None or subject in web.stow_rs_subjects):
            return None, subject  # the handshake verified it against web.stow_rs.client_ca (and no other CA)
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            if subject is not None:
                log.warning("STOW-RS from %s refused: client certificate %s is not in web.stow_rs.subjects",
                            client_of(request), subject[:200])
                return _error(403, "this client certificate's subject is not in web.stow_rs.subjects"), ""
            return _error(401, "a bearer token is required (Authorization: Bearer TOKEN)"
                          + (" or a client certificate" if web.stow_rs_client_ca is not None else ""), challenge), ""
        hashes = web.stow_rs_tokens or []  # endpoint() answers 404 when web.stow_rs has none
        client = client_of(request)
        wait = limiter.attempt(client)  # counts as failed until it succeeds
        if wait:
            log.warning("STOW-RS from %s refused: too many wrong tokens", client)
            return _error(429, f"too many wrong tokens: try again in {wait:.0f} s",
                          {"retry-after": str(int(wait) + 1)}), ""
        ok = await tokens.check(hashes, token) if len(token) <= MAX_TOKEN_LENGTH else False
        if ok is None:
            limiter.undo(client)
            return _error(503, "too many token checks at once: try again in a few seconds", {"retry-after": "5"}), ""
        if not ok:
            log.warning("STOW-RS from %s refused: wrong bearer token", client)
            return _error(401, "wrong bearer token", challenge), ""
        limiter.succeeded(client)
        hashed = tokens.matched(token)
        return None, next((n for n, h in web.stow_rs_token_names.items() if h == hashed), "")

    async def endpoint(request: Request) -> Response:
        config = console.config
        web = config.web
        hashes = web.stow_rs_tokens if web is not None else None
        if web is None or hashes is None or console.ingest is None:
            return _error(404, "STOW-RS ingest is off on this node (web.stow_rs)" if hashes is None
                          else "this node does not receive (serve --role worker)")
        refusal, who = await authorized(request, web)
        if refusal is not None:
            return refusal
        called = str(request.path_params["called_ae"]).strip()
        verdict = REJECT_CALLED_AE if invalid_ae_title(called) or not called else \
            association_verdict(config.routes, called, CALLING_AE)
        if verdict == REJECT_CALLED_AE:
            return _error(404, "no route has this called AE title")
        if verdict == REJECT_CALLING_AE:
            return _error(403, f"no route of this called AE title allows {CALLING_AE} (its calling_ae list)")
        unlisted = stow_rs_unlisted(config.routes, called, CALLING_AE, who)
        if unlisted is not None:
            log.warning("STOW-RS to %s refused: %s is not in route %s's stow_rs_clients", called, who[:200] or "a token", unlisted)
            return _error(403, f"route {unlisted!r} does not list this client in its stow_rs_clients")
        media, params = content_type(request.headers.get("content-type", ""))
        if media != "multipart/related" or params.get("type", DICOM_TYPE).lower() != DICOM_TYPE:
            return _error(415, f'send multipart/related; type="{DICOM_TYPE}" (got {media[:60]!r})')
        if not accepts_json(request.headers.get("accept", "")):
            return _error(406, f"this node answers STOW-RS in {DICOM_JSON} only "
                               f"(Accept: {request.headers.get('accept', '')[:80]!r})")
        boundary = params.get("boundary", "")
        if not boundary or len(boundary) > 70:
            return _error(400, "the multipart/related content type has no valid boundary")
        node, storage = config.node, config.storage
        body = _BodyParts(boundary, console.spool.tmp, lambda: ArrivalWatch(
            max_bytes=node.max_instance_bytes, free_bytes=console.spool.free_bytes, min_free=storage.min_free_bytes))
        try:
            pending = bytearray()
            async for chunk in _chunks(request, node.network_timeout):
                pending += chunk
                if len(pending) >= FEED_BYTES:
                    data, pending = bytes(pending), bytearray()
                    await anyio.to_thread.run_sync(body.feed, data)
            await anyio.to_thread.run_sync(body.feed, bytes(pending))
            body.finish()
            with anyio.CancelScope(shield=True):  # what is being kept is kept whole, answered or not
                stored, failed = await run_in_threadpool(_store_parts, console, called, body.parts)
        except Malformed as exc:
            log.warning("STOW-RS to %s refused: %s", called, exc)
            return _error(400, str(exc))
        except ClientDisconnect:
            log.warning("STOW-RS to %s: the client went away before the body ended; nothing stored", called)
            return _error(400, "the body ended early")
        except TimeoutError:
            log.warning("STOW-RS to %s: no body bytes for %g s (node.network_timeout); nothing stored", called,
                        node.network_timeout)
            return _error(408, f"no body bytes for {node.network_timeout:g} s")
        finally:
            await anyio.to_thread.run_sync(body.discard)
        log.info("STOW-RS to %s: %d instance(s) stored, %d failed (client %s)", called, len(stored), len(failed),
                 who[:200] or "with a token")
        return _response(stored, failed)

    return endpoint

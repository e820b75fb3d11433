"""STOW-RS client: store DICOM files at a DICOMweb archive (PS3.18 10.5).

Why its own module: the ``dicomweb`` destination kind sends with it and ``check-config``
probes the archive with it; both need the same authentication and TLS.  Plain
``http.client`` (no new dependency): ``POST {base}/studies`` with a
``multipart/related; type="application/dicom"`` body streamed from the spool files (a large
study never sits in memory), one request per study, split at ``max_request_bytes``.

The answer is read per instance (PS3.18 Table 10.5.3-1): an instance in
``FailedSOPSequence`` fails alone with its ``FailureReason``; one in
``ReferencedSOPSequence`` is delivered (its ``WarningReason`` kept as a warning); an instance
the archive already holds (Orthanc lists it as referenced; others answer "duplicate SOP
instance", 0x0111) counts as delivered, so a resend after a crash is harmless.  Anything that
is not an answer (refused, reset, timeout, HTTP 5xx, a proxy's 502) fails every instance of
the request with one line; the caller retries them with its back-off.  Errors name the
archive by ``scheme://host:port`` only and never carry credentials or patient data.
"""
from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import ssl
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import urlsplit

from dicom_node.config.fields import http_url_problem
from dicom_node.engine.errors import first_line

__all__ = ["StowAuth", "StowTLS", "StowTarget", "StowResult", "store", "probe", "url_problem", "where",
           "failure_text", "DEFAULT_MAX_REQUEST_BYTES", "DEFAULT_TIMEOUT"]

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024  # per POST; one larger instance still goes, alone
DEFAULT_TIMEOUT = 60.0  # seconds per connect / send / read step (not for the whole upload)
_CHUNK = 1 << 20

# DICOM JSON tags of the STOW-RS response (PS3.18 Table 10.5.3-1).
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"

# "Duplicate SOP Instance" (PS3.7 C.4.2.1.4 / Annex C): the archive already has it.
_ALREADY_STORED = {0x0111}


@dataclass
class StowAuth:
    """How we authenticate: HTTP basic (password read from a file) or a bearer token (from a
    file or an environment variable).  Secrets are read at each request, so a rotated token
    needs no reload; they never go into a URL, a log line or an error."""

    user: str | None = None
    password_file: Path | None = None
    bearer_file: Path | None = None
    bearer_env: str | None = None

    def header(self) -> str | None:
        """The ``Authorization`` header value (None: no authentication); raises ``OSError``
        or ``ValueError`` with a message naming the file or variable, not the secret."""
        if self.user is not None:
            password = _read_secret(self.password_file) if self.password_file else ""
            token = base64.b64encode(f"{self.user}:{password}".encode()).decode()
            return f"Basic {token}"
        if self.bearer_file is not None:
            return f"Bearer {_read_secret(self.bearer_file)}"
        if self.bearer_env is not None:
            value = os.environ.get(self.bearer_env, "").strip()
            if not value:
                raise ValueError(f"environment variable {self.bearer_env} is not set or empty")
            return f"Bearer {value}"
        return None

    def describe(self) -> str:
        if self.user is not None:
            return f"basic auth as {self.user}"
        if self.bearer_file is not None:
            return "bearer token from a file"
        if self.bearer_env is not None:
            return f"bearer token from ${self.bearer_env}"
        return "no authentication"


@dataclass
class StowTLS:
    """https only: ``ca`` to trust (default: the system store), ``verify: false`` to skip the
    check (test set-ups only), ``cert``/``key`` for a client certificate."""

    ca: Path | None = None
    verify: bool = True
    cert: Path | None = None
    key: Path | None = None


@dataclass
class StowTarget:
    """One archive: its DICOMweb base URL (``.../dicom-web``) and how to reach it."""

    url: str
    auth: StowAuth = field(default_factory=StowAuth)
    tls: StowTLS = field(default_factory=StowTLS)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    timeout: float = DEFAULT_TIMEOUT


@dataclass
class StowResult:
    """One file's outcome.  ``status``: the archive's FailureReason or WarningReason, if any."""

    path: Path
    ok: bool
    status: int | None = None
    error: str | None = None  # one line, no patient data, no credentials
    warning: str | None = None


def _read_secret(path: Path) -> str:
    """A password or token file's first line (a trailing newline is not part of it)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the secret file {path} ({exc.__class__.__name__})") from None
    value = text.splitlines()[0].strip() if text.strip() else ""
    if not value:
        raise ValueError(f"the secret file {path} is empty")
    return value


def where(url: str) -> str:
    """How messages name an archive: ``scheme://host:port`` (a path may hold a tenant or token)."""
    from dicom_node.notifications import receiver  # the webhooks' rule, in one place

    return receiver(url)


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a DICOMweb base URL, or None: an http(s) URL without credentials, as
    for webhooks (``config.fields.http_url_problem``), and without a query or fragment."""
    if problem := http_url_problem(url, "use auth"):
        return problem
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        return "must be the DICOMweb base URL, without a query or fragment"
    return None


def failure_text(code: int) -> str:
    """A FailureReason (PS3.18 Table 10.5.3-2, PS3.4 C-STORE statuses) in words."""
    if code == 0xC122:
        return "transfer syntax not supported"
    if 0xA700 <= code <= 0xA7FF:
        return "archive out of resources"
    if 0xA900 <= code <= 0xA9FF:
        return "data set does not match SOP class"
    if 0xC000 <= code <= 0xCFFF:
        return "archive cannot understand the instance"
    return {0x0110: "processing failure", 0x0111: "duplicate SOP instance", 0x0112: "no such object instance",
            0x0122: "SOP class not supported", 0x0124: "not authorized"}.get(code, "refused")


def _warning_text(code: int) -> str:
    return {0xB000: "coercion of data elements", 0xB006: "elements discarded",
            0xB007: "data set does not match SOP class"}.get(code, "warning")


# ------------------------------------------------------------------------------ store


@dataclass
class _Item:
    index: int
    path: Path
    study: str
    sop_uid: str
    size: int


def store(target: StowTarget, files: Sequence[Path]) -> list[StowResult]:
    """POST ``files`` to ``{target.url}/studies``; one result per file, in the same order.
    Never raises for a network or archive problem (it comes back as failed results)."""
    results: list[StowResult | None] = [None] * len(files)
    items: list[_Item] = []
    for i, path in enumerate(files):
        item = _inspect(i, Path(path))
        if isinstance(item, str):
            results[i] = StowResult(Path(path), False, error=item)
        else:
            items.append(item)
    for batch in _requests(items, target.max_request_bytes):
        for item, result in zip(batch, _post(target, batch), strict=True):
            results[item.index] = result
    return [r for r in results if r is not None]


def _inspect(index: int, path: Path) -> _Item | str:
    """The UIDs the request and its answer are matched by, or why the file cannot be sent."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True,
                             specific_tags=["StudyInstanceUID", "SOPInstanceUID"])
        size = path.stat().st_size
    except FileNotFoundError:
        return "file not found"
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        return f"cannot read DICOM file ({exc.__class__.__name__})"
    study, sop = str(ds.get("StudyInstanceUID", "") or ""), str(ds.get("SOPInstanceUID", "") or "")
    if not study or not sop:
        return "file has no Study or SOP Instance UID"
    return _Item(index, path, study, sop, size)


def _requests(items: list[_Item], limit: int) -> list[list[_Item]]:
    """One request per study, split where the next file would pass ``limit`` bytes."""
    out: list[list[_Item]] = []
    for study in dict.fromkeys(item.study for item in items):
        current: list[_Item] = []
        size = 0
        for item in (i for i in items if i.study == study):
            if current and size + item.size > limit:
                out.append(current)
                current, size = [], 0
            current.append(item)
            size += item.size
        if current:
            out.append(current)
    return out


def _connection(target: StowTarget) -> tuple[http.client.HTTPConnection, str]:
    """A connection to the archive and the path of its ``studies`` resource."""
    parts = urlsplit(target.url)
    base = parts.path.rstrip("/")
    if parts.scheme == "https":
        return (http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=target.timeout,
                                            context=ssl_context(target.tls)), base)
    return http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=target.timeout), base


def ssl_context(tls: StowTLS) -> ssl.SSLContext:
    """Verify the archive against ``tls.ca`` (else the system store); our certificate if set."""
    ctx = ssl.create_default_context(cafile=str(tls.ca) if tls.ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.cert is not None:
        ctx.load_cert_chain(str(tls.cert), str(tls.key) if tls.key else None)
    return ctx


def _headers(target: StowTarget, extra: dict[str, str]) -> dict[str, str]:
    headers = {"User-Agent": "dicom-node", "Accept": "application/dicom+json", **extra}
    authorization = target.auth.header()
    if authorization is not None:
        headers["Authorization"] = authorization
    return headers


def _post(target: StowTarget, batch: list[_Item]) -> list[StowResult]:
    """One STOW-RS request; the archive's answer mapped back onto the files."""
    archive = where(target.url)

    def fail_all(error: str, status: int | None = None) -> list[StowResult]:
        return [StowResult(item.path, False, status=status, error=error) for item in batch]

    boundary = f"dicom-node-{uuid.uuid4().hex}"
    heads = [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() for _ in batch]
    tail = f"--{boundary}--\r\n".encode()
    length = sum(len(h) + item.size + 2 for h, item in zip(heads, batch)) + len(tail)
    try:
        headers = _headers(target, {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Content-Length": str(length)})
    except ValueError as exc:
        return fail_all(str(exc))
    conn = None
    try:
        conn, base = _connection(target)
        try:
            conn.request("POST", f"{base}/studies", body=_body(heads, batch, tail), headers=headers)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the archive answered before reading it all (401, 413): read that answer below
        response = conn.getresponse()
        body = response.read()
        status = response.status
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return fail_all(_network_error(archive, exc, target.timeout))
    finally:
        if conn is not None:
            conn.close()
    return _answer(archive, status, body, batch, fail_all)


def _body(heads: list[bytes], batch: list[_Item], tail: bytes) -> Iterator[bytes]:
    """The multipart body, read from the files as it is sent."""
    for head, item in zip(heads, batch):
        yield head
        sent = 0
        with open(item.path, "rb") as f:
            while chunk := f.read(_CHUNK):
                sent += len(chunk)
                yield chunk
        if sent != item.size:  # the Content-Length would be wrong: abandon the request
            raise OSError(f"a spool file changed size while being sent ({item.path.name})")
        yield b"\r\n"
    yield tail


def _network_error(archive: str, exc: BaseException, timeout: float) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return f"cannot connect to {archive} (refused)"
    if isinstance(exc, TimeoutError):
        return f"no answer from {archive} within {timeout:g} s"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: the certificate of {archive} is not trusted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake with {archive} failed ({exc.reason or exc.__class__.__name__})"
    if isinstance(exc, FileNotFoundError) and exc.filename is None:
        return f"cannot connect to {archive}: {first_line(exc, 200)}"
    return f"{archive}: {exc.__class__.__name__}: {first_line(exc, 200)}"


def _answer(archive: str, status: int, body: bytes, batch: list[_Item],
            fail_all: Callable[..., list[StowResult]]) -> list[StowResult]:
    """Map an HTTP answer onto the files of the request."""
    if status in (401, 403):
        return fail_all(f"{archive} refused our credentials (HTTP {status})")
    if 300 <= status < 400:
        return fail_all(f"{archive} redirects (HTTP {status}): configure the final DICOMweb base URL")
    if status == 413:
        return fail_all(f"{archive} refused the request as too large (HTTP 413): lower max_request_bytes")
    parsed = _stow_response(body)
    if parsed is None:
        if 200 <= status < 300 and status != 202:
            return [StowResult(item.path, True) for item in batch]  # "all stored" without details
        return fail_all(f"{archive} answered HTTP {status} without a STOW-RS response", status=None)
    referenced, failed = parsed
    results = []
    for item in batch:
        if item.sop_uid in failed and failed[item.sop_uid] not in _ALREADY_STORED:
            code = failed[item.sop_uid]
            results.append(StowResult(item.path, False, status=code,
                                      error=f"{archive} failed the instance: {failure_text(code)} (0x{code:04X})"))
        elif item.sop_uid in failed:
            results.append(StowResult(item.path, True, status=failed[item.sop_uid]))
        elif item.sop_uid in referenced:
            warning_code = referenced[item.sop_uid]
            warning = f"{_warning_text(warning_code)} (0x{warning_code:04X})" if warning_code is not None else None
            results.append(StowResult(item.path, True, status=warning_code, warning=warning))
        else:
            results.append(StowResult(item.path, False, error=f"{archive} did not confirm the instance "
                                                              f"(HTTP {status})"))
    return results


def _stow_response(body: bytes) -> tuple[dict[str, int | None], dict[str, int]] | None:
    """(referenced SOP UID -> WarningReason or None, failed SOP UID -> FailureReason), or None
    when ``body`` is not a DICOM JSON STOW-RS response."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(doc, list) and len(doc) == 1:
        doc = doc[0]
    if not isinstance(doc, dict) or not ({_FAILED_SOP_SEQUENCE, _REFERENCED_SOP_SEQUENCE} & set(doc)):
        return None
    referenced = {uid: _code(entry, _WARNING_REASON) for uid, entry in _sequence(doc, _REFERENCED_SOP_SEQUENCE)}
    failed = {uid: _code(entry, _FAILURE_REASON) or 0x0110 for uid, entry in _sequence(doc, _FAILED_SOP_SEQUENCE)}
    return referenced, failed


def _sequence(doc: dict[str, Any], tag: str) -> Iterator[tuple[str, dict[str, Any]]]:
    element = doc.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    for entry in values if isinstance(values, list) else []:
        if isinstance(entry, dict):
            uid = _first(entry, _REFERENCED_SOP_INSTANCE_UID)
            if isinstance(uid, str) and uid:
                yield uid, entry


def _first(entry: dict[str, Any], tag: str) -> Any:
    element = entry.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


def _code(entry: dict[str, Any], tag: str) -> int | None:
    value = _first(entry, tag)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 16) if value.lower().startswith("0x") else int(value)
        except ValueError:
            return None
    return None


# ------------------------------------------------------------------------------ probe


def probe(target: StowTarget) -> str | None:
    """Whether the archive answers at its base URL with our credentials: None, or why not.

    ``GET {base}/studies?limit=1`` (QIDO-RS): any answer but 401/403, 5xx or a redirect
    means the URL, TLS and credentials work (an archive without QIDO-RS answers 404, 405
    or 501, and that is fine: only STOW-RS is used).  For ``check-config``.
    """
    archive = where(target.url)
    try:
        headers = _headers(target, {})
    except ValueError as exc:
        return str(exc)
    conn = None
    try:
        conn, base = _connection(target)
        conn.request("GET", f"{base}/studies?limit=1", headers=headers)
        response = conn.getresponse()
        response.read(1 << 16)
        status = response.status
    except (OSError, ValueError, http.client.HTTPException) as exc:
        return _network_error(archive, exc, target.timeout)
    finally:
        if conn is not None:
            conn.close()
    if status in (401, 403):
        return f"{archive} refused our credentials (HTTP {status})"
    if 300 <= status < 400:
        return f"{archive} redirects (HTTP {status}): configure the final DICOMweb base URL"
    if status >= 500 and status != 501:  # 501: no QIDO-RS here, but the archive answered
        return f"{archive} answered HTTP {status}"
    return None

"""The ``dicom`` destination kind: C-STORE to a DICOM peer, optionally over TLS.

YAML: ``{type: dicom, ae_title, host, port, calling_ae, tls: {ca, cert, key, check_hostname},
timeout}``.  A resend is harmless: a PACS stores an instance again under the same SOP Instance
UID.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from dicom_node.config.fields import ae_title_field, integer, number, string, tls_settings
from dicom_node.config.probes import check_tls
from dicom_node.config.settings import DestinationSettings, NodeConfig, TLSSettings
from dicom_node.engine.errors import first_line
from dicom_node.engine.yaml_config import Problems, join_path

from .base import DeliveryResult, DestinationKind, register

if TYPE_CHECKING:
    from pydicom import Dataset
    from pydicom.uid import UID
    from pynetdicom import AE
    from pynetdicom.association import Association
    from pynetdicom.events import Event

__all__ = ["DicomDestination", "DicomKind", "KIND", "deliver_dicom"]

log = logging.getLogger("dicom_node.destinations")

# Presentation contexts per association (PS3.8: odd IDs 1..255).
_MAX_CONTEXTS = 128

# A destination on one of these hosts at the node's port is the node itself.
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0", "::"}


@dataclass
class DicomDestination(DestinationSettings):
    """A DICOM peer (C-STORE), optionally over TLS."""

    name: str
    type: str = "dicom"
    ae_title: str | None = None
    host: str | None = None
    port: int | None = None
    calling_ae: str | None = None  # our AE title towards this peer (default: node.ae_title)
    tls: TLSSettings | None = None
    timeout: float | None = None  # seconds for connect/ACSE/DIMSE; None: the caller's default


class DicomKind(DestinationKind[DicomDestination]):
    type = "dicom"
    keys = frozenset({"ae_title", "host", "port", "calling_ae", "tls", "timeout"})
    required = frozenset({"ae_title", "host", "port"})

    def parse(self, name: str, raw: dict[str, Any], path: str, problems: Problems,
              base_dir: Path) -> DicomDestination:
        raw = self.fields(raw, path, problems)
        tls_raw = raw.get("tls")
        return DicomDestination(
            name=name,
            ae_title=ae_title_field(raw, "ae_title", path, problems),
            host=string(raw, "host", path, problems),
            port=integer(raw, "port", path, problems, None, 1, 65535),
            calling_ae=ae_title_field(raw, "calling_ae", path, problems),
            tls=(tls_settings(tls_raw, join_path(path, "tls"), problems, base_dir, server=False)
                 if tls_raw is not None else None),
            timeout=number(raw, "timeout", path, problems, None, 0, False),
        )

    def finish(self, dest: DicomDestination, cfg: NodeConfig, path: str, problems: Problems) -> None:
        """Our AE title defaults to the node's; a peer that is this node's own route is a loop."""
        if dest.calling_ae is None:
            dest.calling_ae = cfg.node.ae_title
        called = {r.called_ae for r in cfg.routes}
        if (dest.port == cfg.node.port and dest.ae_title in called
                and (dest.host in _LOCAL_HOSTS or dest.host == cfg.node.host)):
            problems.add(path, f"sends back to this node's own route {dest.ae_title!r} (an endless loop)")

    def check(self, dest: DicomDestination, path: str, problems: Problems) -> None:
        if dest.tls is not None:
            check_tls(dest.tls, join_path(path, "tls"), problems, server=False)

    def describe(self, dest: DicomDestination) -> str:
        return _peer(dest) + (" over TLS" if dest.tls else "")

    def deliver(self, dest: DicomDestination, files: Sequence[Path], *, calling_ae: str,
                timeout: float) -> list[DeliveryResult]:
        return deliver_dicom(dest, files, calling_ae=dest.calling_ae or calling_ae, timeout=timeout)


@dataclass
class _Item:
    """One file to send, with what negotiation needs to know about it."""

    index: int
    path: Path
    sop_class: str
    transfer_syntax: str


def deliver_dicom(
    dest: DicomDestination, files: Sequence[Path], *, calling_ae: str, timeout: float = 30.0
) -> list[DeliveryResult]:
    """C-STORE every file over one association (more only beyond 128 presentation contexts).

    For each SOP class we propose the files' own transfer syntaxes (one context each, so a
    peer that takes JPEG 2000 gets the original bytes) plus a context offering Explicit and
    Implicit VR Little Endian; a file whose syntax the peer refused is decompressed and sent
    uncompressed.
    """
    results: list[DeliveryResult | None] = [None] * len(files)
    items: list[_Item] = []
    for i, path in enumerate(files):
        item_or_error = _inspect(i, Path(path))
        if isinstance(item_or_error, str):
            results[i] = DeliveryResult(Path(path), False, error=item_or_error)
        else:
            items.append(item_or_error)

    for batch in _batches(items):
        for item, result in zip(batch, _send_batch(dest, batch, calling_ae, timeout), strict=True):
            results[item.index] = result
    return [r for r in results if r is not None]


def _inspect(index: int, path: Path) -> _Item | str:
    """Read the file meta (not the pixels) or say in one line why the file cannot be sent."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from dicom_node.engine.dicom_decode import transfer_syntax

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except FileNotFoundError:
        return "file not found"
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        return f"cannot read DICOM file ({exc.__class__.__name__})"
    meta = getattr(ds, "file_meta", None)
    ts = transfer_syntax(ds)
    sop = str(getattr(meta, "MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", "") or "")
    if not ts or not sop:
        return "file has no SOP Class UID or Transfer Syntax UID in its meta information"
    return _Item(index, path, sop, ts)


def _contexts_for(items: Sequence[_Item]) -> list[tuple[str, list[str]]]:
    """(abstract syntax, transfer syntaxes) to propose: native syntaxes first, then uncompressed."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    uncompressed = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    contexts: list[tuple[str, list[str]]] = []
    seen: set[tuple[str, str]] = set()
    for item in items:
        if item.transfer_syntax not in uncompressed and (item.sop_class, item.transfer_syntax) not in seen:
            seen.add((item.sop_class, item.transfer_syntax))
            contexts.append((item.sop_class, [item.transfer_syntax]))
    for sop in dict.fromkeys(item.sop_class for item in items):
        contexts.append((sop, list(uncompressed)))
    return contexts


def _batches(items: list[_Item]) -> list[list[_Item]]:
    """Split by SOP class so that no association needs more than 128 contexts (rare)."""
    batches: list[list[_Item]] = []
    current: list[_Item] = []
    for sop in dict.fromkeys(item.sop_class for item in items):
        group = [item for item in items if item.sop_class == sop]
        if current and len(_contexts_for(current + group)) > _MAX_CONTEXTS:
            batches.append(current)
            current = []
        current.extend(group)
    if current:
        batches.append(current)
    return batches


def _peer(dest: DicomDestination) -> str:
    return f"{dest.ae_title}@{dest.host}:{dest.port}"


def _send_batch(dest: DicomDestination, items: list[_Item], calling_ae: str, timeout: float) -> list[DeliveryResult]:
    from pynetdicom import _config, evt

    # send_c_store(path) then streams the file from disk instead of decoding it into memory
    # (a 2 GB instance stays out of RAM).  Process-wide, but only affects sends of paths.
    _config.STORE_SEND_CHUNKED_DATASET = True

    def fail_all(error: str) -> list[DeliveryResult]:
        return [DeliveryResult(item.path, False, error=error) for item in items]

    if not dest.host or not dest.port or not dest.ae_title:
        return fail_all("destination needs ae_title, host and port")
    timeout = float(dest.timeout or timeout)
    ae = _calling_ae(calling_ae, timeout, items)

    tls_args = None
    if dest.tls is not None:
        from dicom_node.errors import UserError
        from dicom_node.tls import client_context

        try:
            tls_args = (client_context(dest.tls), dest.host)
        except UserError as exc:
            return fail_all(str(exc))

    connected: list[bool] = []  # set by EVT_CONN_OPEN: tells "refused/unreachable" from "aborted"

    def on_open(event: Event) -> None:
        connected.append(True)
        _no_delay(event)

    try:
        assoc = ae.associate(
            dest.host, int(dest.port), ae_title=dest.ae_title, tls_args=tls_args,
            evt_handlers=[(evt.EVT_CONN_OPEN, on_open)],
        )
    except (OSError, ValueError, RuntimeError) as exc:  # bad address, TLS failures raised early
        return fail_all(f"cannot connect to {_peer(dest)}: {exc.__class__.__name__}: {first_line(exc, 200)}")
    if not assoc.is_established:
        error = _association_error(assoc, dest, bool(connected), tls_args is not None, timeout)
        log.warning("delivery to destination %s failed: %s", dest.name, error)
        return fail_all(error)

    results = _store_all(assoc, items, dest)
    ok = sum(r.ok for r in results)
    log.info("delivered %d/%d instance(s) to %s (%s)", ok, len(results), dest.name, _peer(dest))
    return results


def _calling_ae(calling_ae: str, timeout: float, items: list[_Item]) -> AE:
    """Our AE for one association: every timeout ``timeout``, the contexts ``items`` need."""
    from pynetdicom import AE
    from pynetdicom.presentation import build_context

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    contexts = _contexts_for(items)[:_MAX_CONTEXTS]
    ae.requested_contexts = [build_context(sop, ts) for sop, ts in contexts]
    return ae


def _association_error(assoc: Association, dest: DicomDestination, connected: bool, tls: bool, timeout: float) -> str:
    """Why an association was not established, in one line."""
    if not connected and tls and _tcp_reachable(str(dest.host), int(dest.port or 0), timeout):
        return f"TLS handshake with {_peer(dest)} failed (certificate not trusted or protocol mismatch)"
    if not connected:
        return f"cannot connect to {_peer(dest)} (refused or unreachable)"
    if assoc.is_rejected:
        return f"association rejected by {_peer(dest)}"
    if assoc.is_aborted:
        return f"association aborted by {_peer(dest)} (or TLS handshake failed)"
    return f"no answer from {_peer(dest)} within {timeout:g} s"


def _store_all(assoc: Association, items: list[_Item], dest: DicomDestination) -> list[DeliveryResult]:
    """C-STORE every item over an established association, then release it (abort it when broken)."""
    results: list[DeliveryResult] = []
    try:
        broken = False
        for n, item in enumerate(items):
            if broken or not assoc.is_established:
                results.append(DeliveryResult(item.path, False, error=f"association with {_peer(dest)} ended early"))
                continue
            result = _store_one(assoc, item, dest, msg_id=(n + 1) % 65536)
            results.append(result)
            # No response means a DIMSE timeout or an abort: the association is unusable
            # even if pynetdicom has not noticed yet, so don't wait another timeout per file.
            broken = result.error is not None and result.error.startswith("no C-STORE response")
    finally:
        if assoc.is_established:
            if broken:
                assoc.abort()
            else:
                assoc.release()
    return results


def _no_delay(event: Event) -> None:
    """Turn off Nagle's algorithm on our side of the association.

    A C-STORE request ends in a small PDV that Nagle holds back until the peer's delayed ACK
    (measured on loopback, 40 small instances to a pynetdicom SCP: 55 ms per instance with it,
    9 ms without).
    """
    import socket

    wrapper = event.assoc.dul.socket
    sock = wrapper.socket if wrapper is not None else None
    if sock is None:
        return  # already closed
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # not a TCP socket: nothing to tune


def _store_one(assoc: Association, item: _Item, dest: DicomDestination, msg_id: int = 1) -> DeliveryResult:
    """Send one file in the accepted context that needs the least conversion."""
    import pydicom
    from pydicom.uid import UID

    accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == item.sop_class]
    if not accepted:
        return DeliveryResult(item.path, False, error=f"peer {_peer(dest)} refused SOP class {item.sop_class}")
    syntaxes = {str(cx.transfer_syntax[0]) for cx in accepted}
    try:
        if item.transfer_syntax in syntaxes:
            # The peer takes the file as it is: stream it from disk (no decode, no re-encode).
            status_ds = assoc.send_c_store(item.path, msg_id=msg_id)
            return _result(item, status_ds, dest)
        # The peer accepted this SOP class only in another syntax: re-encode in memory.
        ds = pydicom.dcmread(str(item.path))
        ts = UID(item.transfer_syntax)
        if ts.is_compressed:
            ds.decompress(generate_instance_uid=False)  # same instance, new encoding
        elif not ts.is_little_endian:
            _big_to_little_endian(ds)
            ds.file_meta.TransferSyntaxUID = _plain_syntax(syntaxes)
        elif ts.is_deflated:
            ds.file_meta.TransferSyntaxUID = _plain_syntax(syntaxes)
        # (explicit <-> implicit VR little endian: pynetdicom converts while encoding)
        status_ds = assoc.send_c_store(ds, msg_id=msg_id)
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch or the worker
        if not assoc.is_established:
            return DeliveryResult(item.path, False, error=f"association with {_peer(dest)} ended early")
        # Typically: no decoder for the syntax, or a file pynetdicom cannot encode.
        log.warning("cannot send a file to %s: %s", dest.name, exc.__class__.__name__)
        return DeliveryResult(item.path, False, error=f"cannot send: {exc.__class__.__name__}: {first_line(exc, 200)}")
    return _result(item, status_ds, dest)


def _result(item: _Item, status_ds: Dataset | None, dest: DicomDestination) -> DeliveryResult:
    """Turn a C-STORE response (or its absence) into a result; warnings count as success."""
    from pynetdicom.status import code_to_category

    if not status_ds or "Status" not in status_ds:
        return DeliveryResult(item.path, False, error=f"no C-STORE response from {_peer(dest)} (timeout or abort)")
    status = int(status_ds.Status)
    category = code_to_category(status)
    if category in ("Success", "Warning"):
        return DeliveryResult(item.path, True, status=status)
    return DeliveryResult(item.path, False, status=status, error=f"C-STORE {category.lower()} status 0x{status:04X}")


_RAW_BINARY_VRS = {"OB or OW", "US or OW", "US or SS or OW", "OW", "OF", "OD", "OL", "OV", "UN"}


def _big_to_little_endian(ds: Dataset) -> None:
    """Re-encode a (retired) Explicit VR Big Endian dataset's pixels for a little endian peer.

    pydicom re-encodes parsed values itself; raw binary elements are byte-swapped only for
    Pixel Data, so a file with other word-sized binary data (LUTs, overlays) is refused
    rather than sent corrupted.
    """
    others = [e.keyword or str(e.tag) for e in ds.iterall()
              if e.VR in _RAW_BINARY_VRS and e.tag != 0x7FE00010]
    if others:
        raise ValueError(f"big endian file with binary elements that cannot be converted ({', '.join(others[:3])})")
    if "PixelData" in ds:
        pixels = ds.pixel_array
        if pixels.dtype.itemsize > 1:
            pixels = pixels.astype(pixels.dtype.newbyteorder("<"))
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OW" if pixels.dtype.itemsize > 1 else "OB"
    ds.set_original_encoding(False, True)


def _tcp_reachable(host: str, port: int, timeout: float) -> bool:
    """Whether a plain TCP connection opens: tells a TLS failure from a peer that is down."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=min(timeout, 5.0)):
            return True
    except OSError:
        return False


def _plain_syntax(accepted: set[str]) -> UID:
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    return ExplicitVRLittleEndian if ExplicitVRLittleEndian in accepted else ImplicitVRLittleEndian


KIND = register(DicomKind())

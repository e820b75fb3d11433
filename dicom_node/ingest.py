"""The store path shared by the DICOM listener (C-STORE) and STOW-RS ingest: check a received
data set, keep it durably in the spool, record it, and say with a C-STORE status how it went.

Why one path: an instance is acknowledged by either protocol only once it is durable on the spool
and committed in the state database, under the same size, pixel and decode limits, with the same
failure reasons; two copies of these rules would drift.  The caller has the data set in a file
(pynetdicom streams it to ``<spool>/tmp``, :mod:`dicom_node.web.stow` writes each part there) and
turns the status into its protocol's answer (the C-STORE status itself; a STOW-RS
``FailureReason``, which uses the same codes).

Status codes:
  0x0000 success (also for a duplicate SOP Instance UID: idempotent)
  0xA700 out of resources: disk below storage.min_free_bytes, instance larger than
         node.max_instance_bytes or needing more than node.max_decode_bytes to translate, the
         state database unavailable, or any write error (the sender should retry later)
  0xC000 cannot understand: unparsable dataset, missing/invalid UIDs, or UIDs that
         contradict the C-STORE command
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable

from dicom_node.config import NodeConfig
from dicom_node.received import IMAGE_SIZE_KEYWORDS, budget_problem, content_digest, read_header
from dicom_node.routing import fallback_route, match_keywords, select_route
from dicom_node.spool import Spool
from dicom_node.state import STUDY_INFO_KEYWORDS, StateDB, abbreviate

__all__ = ["Ingest", "STATUS_SUCCESS", "STATUS_OUT_OF_RESOURCES", "STATUS_CANNOT_UNDERSTAND", "PROTOCOLS",
           "storage_classes"]

log = logging.getLogger("dicom_node.ingest")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000

PROTOCOLS = ("dimse", "stow-rs")  # the ``protocol`` label of dicom_node_instances_received_total

_HEADER_KEYWORDS = {"SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
                    *IMAGE_SIZE_KEYWORDS}


def storage_classes() -> tuple[str, ...]:
    """The SOP classes the node accepts for storage, over either protocol: the DICOM listener
    negotiates them (``scp``), STOW-RS refuses a part of any other class (``web.stow``)."""
    from pynetdicom import AllStoragePresentationContexts

    return tuple(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts if cx.abstract_syntax is not None)


class Ingest:
    """Checks, keeps and records received data sets for every receiving protocol of a node.

    One per node: its lock serialises the free-space check and the write across C-STORE
    associations and STOW-RS requests alike.
    """

    def __init__(self, config: NodeConfig, spool: Spool, db: StateDB, on_received: Callable[[], None]) -> None:
        self.spool = spool
        self.db = db
        self.on_received = on_received
        self._write_lock = threading.Lock()
        self.configure(config)

    def configure(self, config: NodeConfig) -> None:
        """Take a reloaded config: routes and storage limits apply to the next instance."""
        self._keywords = _HEADER_KEYWORDS | set(STUDY_INFO_KEYWORDS) | match_keywords(config.routes)
        self.config = config

    def store(self, src: Path, called: str, calling: str, *, affected_sop: str = "", affected_class: str = "",
              protocol: str = "dimse") -> int:
        """Check, keep and record the data set in the file ``src`` sent to ``called`` by ``calling``
        over ``protocol`` (one of :data:`PROTOCOLS`); the status to answer with.

        ``affected_sop``/``affected_class``: what the C-STORE request said (empty: nothing to
        compare; STOW-RS passes the part's own SOP Instance UID, for the log).  On success ``src`` was moved into the spool; otherwise the caller removes it.
        Never raises: a failure to persist is 0xA700, never a success.
        """
        try:
            return self._store(src, called, calling, affected_sop, affected_class, protocol)
        except Exception as exc:  # noqa: BLE001 - never success when we could not persist
            from dicom_node.database import first_line, is_unavailable

            if is_unavailable(exc):
                log.error("store refused (0xA700): the state database is unavailable (%s)", first_line(exc))
            else:
                log.exception("store failed unexpectedly (called %s, calling %s)", called, calling)
            return STATUS_OUT_OF_RESOURCES

    def _store(self, src: Path, called: str, calling: str, affected_sop: str, affected_class: str,
               protocol: str) -> int:
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
            return self._store_file(config, src, called, calling, affected_sop, affected_class, protocol)
        try:
            return self._store_file(config, inflated, called, calling, affected_sop, affected_class, protocol)
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
                        attrs: dict[str, Any], called: str, calling: str, protocol: str) -> int:
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
                                           forward=list(fallback.destinations) if fallback else [],
                                           protocol=protocol)
        log.info("sop %s to %s resent with other content: processed again (revision %d; it was %s)",
                 abbreviate(existing.sop_uid), called, revision, existing.state)
        self.on_received()
        return STATUS_SUCCESS

    def _store_file(self, config: NodeConfig, src: Path, called: str, calling: str, affected_sop: str,
                    affected_class: str, protocol: str) -> int:
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
            return self._store_revision(config, src, size, digest, existing, attrs, called, calling, protocol)
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
        route = None if choice.index is None else config.routes[choice.index]
        _, new = self.db.record_received(
            called_ae=called, calling_ae=calling, sop_uid=sop_uid, sop_class=attrs["SOPClassUID"],
            study_uid=attrs["StudyInstanceUID"], series_uid=attrs["SeriesInstanceUID"],
            route=None if route is None else route.name,
            matched=choice.matched, path=str(final), size=size, forward=forward, content_sha256=digest,
            study={col: _text(attrs.get(kw)) for kw, col in STUDY_INFO_KEYWORDS.items()}, protocol=protocol)
        if choice.matched and route is not None:  # a match always names its route
            log.info("received sop %s study %s %s from %s to %s over %s (route %s, %d bytes)", abbreviate(sop_uid),
                     abbreviate(attrs["StudyInstanceUID"]), attrs.get("Modality") or "-", calling, called, protocol,
                     route.name, size)
        else:
            log.info("received sop %s %s from %s to %s: no route matches, kept%s", abbreviate(sop_uid),
                     attrs.get("Modality") or "-", calling, called,
                     f", forwarding original to {','.join(forward)}" if forward else " (not forwarded)")
        self.on_received()
        return STATUS_SUCCESS


def _text(value: Any) -> str:
    """A header value as plain text (a PersonName as its DICOM form, multi-values joined)."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or value.__class__.__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()

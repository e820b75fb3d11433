"""What every destination kind provides (:class:`DestinationKind`), what a delivery returns
(:class:`DeliveryResult`) and the table of kinds by their YAML ``type`` (:data:`KINDS`).

The kinds themselves are the modules of :mod:`dicom_node.destinations`; each ends with
``KIND = register(TheKind())``.  The table lives here, below the kinds, so that a kind module
imports it without importing its siblings.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Sequence, TypeVar

from dicom_node.config.fields import mapping
from dicom_node.engine.defaults import UID_RE
from dicom_node.engine.yaml_config import Problems

if TYPE_CHECKING:
    from dicom_node.config.settings import DestinationSettings, NodeConfig

Settings = TypeVar("Settings", bound="DestinationSettings")
__all__ = ["DeliveryResult", "DestinationKind", "KINDS", "register", "unregister", "valid_uid"]


@dataclass
class DeliveryResult:
    """The outcome of sending one file; network trouble is a result, never an exception."""

    path: Path
    ok: bool
    status: int | None = None  # the peer's status code (the DIMSE status for dicom destinations)
    error: str | None = None  # one line, no PHI


def valid_uid(value: object) -> bool:
    """A DICOM UID safe to use as a file name: digits and dots, at most 64 characters."""
    return isinstance(value, str) and 0 < len(value) <= 64 and UID_RE.match(value) is not None


class DestinationKind(ABC, Generic[Settings]):
    """One kind of destination (``type: dicom``, ``type: folder``...): everything the node knows
    about it, so that a new kind is one module and no edit anywhere else.

    The config loader calls :meth:`parse` for each ``destinations.<name>`` whose ``type`` is this
    kind's, then :meth:`finish` once the whole document is parsed, then :meth:`check` (the only
    step that may touch the machine or the network).  ``check-config`` and the console show
    :meth:`describe`; the deliverers call :meth:`deliver`.  ``Settings`` is the kind's settings
    class (``class FolderKind(DestinationKind[FolderDestination])``): the methods get only those.
    """

    type: str = ""  # the YAML ``type`` that selects this kind
    keys: frozenset[str] = frozenset()  # the keys its mapping may have besides ``type``
    required: frozenset[str] = frozenset()  # of those, the ones it must have

    @abstractmethod
    def parse(self, name: str, raw: dict[str, Any], path: str, problems: Problems,
              base_dir: Path) -> Settings:
        """The settings of destination ``name`` from its YAML mapping ``raw`` (at ``path``).

        Pure: every mistake goes to ``problems`` with its YAML path (never raise), and a
        settings object comes back anyway.  Relative file names are resolved against ``base_dir``.
        Start with ``raw = self.fields(raw, path, problems)`` (unknown and missing keys).
        """

    def finish(self, dest: Settings, cfg: NodeConfig, path: str, problems: Problems) -> None:
        """Called once the whole config is parsed: take defaults from other sections and report
        problems that involve them (a destination that loops back into this node).  Pure."""

    def check(self, dest: Settings, path: str, problems: Problems) -> None:
        """This machine can serve the destination (files exist and load, folders are writable);
        run by ``check-config`` and ``serve`` after the schema."""

    def reach(self, dest: Settings, path: str, problems: Problems) -> None:
        """The peer answers now (a DICOMweb archive at its URL with our credentials); run by
        ``check-config`` only: the node itself starts, and queues, while a peer is down."""

    @abstractmethod
    def describe(self, dest: Settings) -> str:
        """Where the destination sends, in a few words (``PACS@10.0.0.5:104``, ``/data/outbox``);
        shown by ``check-config`` and the console, so never a secret or a password."""

    @abstractmethod
    def deliver(self, dest: Settings, files: Sequence[Path], *, calling_ae: str,
                timeout: float) -> list[DeliveryResult]:
        """Send ``files`` (one study's, at least one); one result per file, in the same order.

        Never raise for trouble with the peer or a file: return ``ok=False`` results with a
        one-line error (no patient data), and the deliverer retries them with back-off.  A
        resend of a delivered file must be harmless (the node resends after a crash).
        ``calling_ae`` is the node's AE title; ``timeout`` the seconds a peer may take.
        """

    def fields(self, raw: dict[str, Any], path: str, problems: Problems) -> dict[str, Any]:
        """``raw`` after reporting keys it may not have and required keys it lacks."""
        return mapping(raw, path, {"type"} | self.keys, set(self.required), problems) or {}


KINDS: dict[str, DestinationKind[Any]] = {}


def register(kind: DestinationKind[Settings]) -> DestinationKind[Settings]:
    """Make ``kind`` known under its ``type`` (to the config loader, check-config, the console
    and the deliverers); returns it, so a kind module ends with ``KIND = register(MyKind())``."""
    if not kind.type:
        raise ValueError(f"{kind.__class__.__name__} has no type")
    if KINDS.get(kind.type, kind) is not kind:
        raise ValueError(f"destination type {kind.type!r} is registered twice")
    KINDS[kind.type] = kind
    return kind


def unregister(kind: DestinationKind[Any]) -> None:
    """Forget ``kind`` (tests that register a kind of their own)."""
    if KINDS.get(kind.type) is kind:
        del KINDS[kind.type]

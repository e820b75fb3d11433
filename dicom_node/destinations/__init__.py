"""Destinations: where translated instances go, one kind per module, registered in one place.

A kind (a :class:`DestinationKind`, in :mod:`.base`) owns everything the node knows about it:
its config keys (parsing and validation), its check against this machine, the few words
``check-config`` and the console show, and its delivery.  The config loader, ``check-config``,
the console and the deliverers find a kind by its YAML ``type`` in :data:`KINDS` and never name
one.  The kinds today: :mod:`.dicom` (C-STORE to a DICOM peer), :mod:`.dicomweb` (STOW-RS to a
DICOMweb archive) and :mod:`.folder` (one file per instance in a folder).

How to add a kind, say ``type: mykind``:

1. Write ``dicom_node/destinations/mykind.py`` with:

   - its settings, a dataclass subclass of
     :class:`dicom_node.config.settings.DestinationSettings` whose ``type`` defaults to
     ``"mykind"`` (``name: str`` first, then ``type: str = "mykind"``, then its own fields, all
     with defaults);
   - a :class:`DestinationKind` subclass with ``type = "mykind"``, ``keys`` (its YAML keys
     besides ``type``), ``required`` (those it must have) and the methods ``parse`` (start with
     ``raw = self.fields(raw, path, problems)``, then read each key with the typed readers of
     :mod:`dicom_node.config.fields`, e.g. ``string(raw, "url", path, problems)``), ``describe``
     and ``deliver``; ``finish``, ``check`` and ``reach`` when it needs them (TLS files:
     :func:`dicom_node.config.fields.tls_settings` and :func:`dicom_node.config.probes.check_tls`;
     ``reach``: check-config asks the peer, as :mod:`.dicomweb` does);
   - as its last line ``KIND = register(MyKind())``.

   Import heavy libraries inside ``deliver``, not at the top: the CLI imports every kind.
   :mod:`.folder` is the smallest example.
2. Add its name to the import line below: ``from . import dicom, folder, mykind``.

That is all: the retries, back-off, dead letters, held deliveries, ``retry``, metrics and the
console's counts work per destination name and need nothing from a kind.  Tests: a kind with
its own YAML keys and a stub delivery goes through the loader, ``check-config``, the console and
a node in ``tests/test_destination_kinds.py``.

``deliver`` (the deliverers' entry) and ``describe`` dispatch on ``dest.type``.  Network trouble
never raises: it comes back as ``ok=False`` results with a one-line error (no patient data), so
the deliverer can retry.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

# The kinds: importing a kind's module registers it (its last line).  A new kind: one more name here.
from . import dicom, dicomweb, folder  # noqa: E402,I001
from .base import KINDS, DeliveryResult, DestinationKind, register, unregister, valid_uid
from .dicom import DicomDestination, deliver_dicom  # noqa: E402
from .folder import FolderDestination, deliver_folder  # noqa: E402

if TYPE_CHECKING:
    from dicom_node.config.settings import DestinationSettings

__all__ = ["KINDS", "DeliveryResult", "DestinationKind", "register", "unregister", "kind_names", "deliver",
           "describe", "valid_uid", "DicomDestination", "FolderDestination", "deliver_dicom", "deliver_folder",
           "dicom", "dicomweb", "folder"]


def kind_names() -> str:
    """The known types for a message: ``dicom or folder``, ``dicom, dicomweb or folder``."""
    names = sorted(KINDS)
    return " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"


def deliver(
    dest: DestinationSettings, files: Sequence[Path], *, calling_ae: str, timeout: float = 30.0
) -> list[DeliveryResult]:
    """Send ``files`` to ``dest``; one result per file, in the same order.

    ``calling_ae`` is the node's AE title (a DICOM destination's own ``calling_ae`` wins).
    """
    files = [Path(f) for f in files]
    if not files:
        return []
    kind = KINDS.get(dest.type)
    if kind is None:
        return [DeliveryResult(f, False, error=f"unknown destination type {dest.type!r}") for f in files]
    return kind.deliver(dest, files, calling_ae=calling_ae, timeout=timeout)


def describe(dest: DestinationSettings) -> str:
    """Where ``dest`` sends, in a few words and without secrets (check-config, the console)."""
    kind = KINDS.get(dest.type)
    return kind.describe(dest) if kind is not None else f"unknown destination type {dest.type!r}"

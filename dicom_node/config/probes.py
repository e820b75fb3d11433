"""Probes of one folder or one set of TLS files on this machine, each adding ``path: message``
problems: shared by the node's own settings (:mod:`.environment`) and the destination kinds
(:mod:`dicom_node.destinations`), which check their own files with them.
"""
from __future__ import annotations

import os
from pathlib import Path

from dicom_node.engine.errors import UserError
from dicom_node.engine.yaml_config import Problems, join_path

from .settings import TLSSettings

__all__ = ["check_writable", "check_tls"]


def check_writable(folder: Path, path: str, problems: Problems) -> None:
    """A folder we must write into: it exists and is writable, or can be created."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # the folder would be created below its nearest existing parent
    if probe.exists() and not probe.is_dir():
        problems.add(path, f"not a folder: {probe}")
    elif not _can_write(probe):
        problems.add(path, f"not writable: {folder}" if probe == folder else f"not writable (cannot create): {folder}")


def _can_write(folder: Path) -> bool:
    """Really try: permission bits lie for root and on read-only mounts."""
    import tempfile

    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".dicom-node-probe-"):
            return True
    except OSError:
        return False


def check_tls(tls: TLSSettings, path: str, problems: Problems, server: bool) -> None:
    """The files exist and load as the node will load them (``server``: our listener's)."""
    files = [tls.cert, tls.key, tls.ca]
    for key, p in zip(("cert", "key", "ca"), files):
        if p is not None and not p.is_file():
            problems.add(join_path(path, key), f"file not found: {p}")
    present = [p for p in files if p is not None]
    complete = tls.cert is not None and tls.key is not None if server else bool(present)
    if complete and all(p.is_file() for p in present):
        # Load them now, as the node will: a key that does not match its certificate, a
        # password-protected key or a file that is not PEM is found by check-config.
        from dicom_node import tls as tls_module

        try:
            (tls_module.server_context if server else tls_module.client_context)(tls)
        except UserError as exc:
            problems.add(path, str(exc).removeprefix("tls: ").removeprefix("node.tls: "))

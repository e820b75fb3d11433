"""Checks of a parsed node config against the machine it will run on (the schema's I/O half).

Folders the node writes (spool, folder destinations) are writable or can be created; TLS
files exist and load as the node will load them; model files are style models (their header
only).  ``check-config`` and ``serve`` run these after the schema (:func:`dicom_node.config.load_config`).
"""
from __future__ import annotations

import os
from pathlib import Path

from dicom_node.engine.errors import UserError
from dicom_node.engine.defaults import MODEL_FORMAT as STYLE_MODEL_FORMAT
from dicom_node.engine.yaml_config import Problems, join_path

from .settings import DicomDestination, FolderDestination, ModelSettings, NodeConfig, TLSSettings

__all__ = ["check_environment", "style_model_file_problem", "STYLE_MODEL_FORMAT"]


def check_environment(cfg: NodeConfig, base_dir: Path = Path(".")) -> list[str]:
    """Every environment problem of ``cfg`` as ``path: message``; may finish resolving model paths
    (a bare name such as ``default`` is a file in the config's folder when one exists there)."""
    pr = Problems()
    if cfg.node.tls is not None:
        _check_tls(cfg.node.tls, "node.tls", pr, server=True)
    if cfg.web is not None and cfg.web.tls is not None and cfg.web.tls is not cfg.node.tls:
        _check_tls(cfg.web.tls, "web.tls", pr, server=True)
    _check_writable(cfg.storage.spool_dir, "storage.spool_dir", pr)
    if cfg.storage.database is not None:
        _check_database(cfg.storage.database, pr)
    for name, model in cfg.models.items():
        _check_model(model, join_path(join_path("models", name), "path"), pr, Path(base_dir))
    for name, dest in cfg.destinations.items():
        path = join_path("destinations", name)
        if isinstance(dest, DicomDestination) and dest.tls is not None:
            _check_tls(dest.tls, join_path(path, "tls"), pr, server=False)
        if isinstance(dest, FolderDestination) and dest.path is not None:
            _check_writable(dest.path, join_path(path, "path"), pr)
    return pr.items


def _check_writable(p: Path, path: str, pr: Problems) -> None:
    """A folder we must write into: it exists and is writable, or can be created."""
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # the folder would be created below its nearest existing parent
    if probe.exists() and not probe.is_dir():
        pr.add(path, f"not a folder: {probe}")
    elif not _can_write(probe):
        pr.add(path, f"not writable: {p}" if probe == p else f"not writable (cannot create): {p}")


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


def _check_database(url: str, pr: Problems) -> None:
    """The PostgreSQL server answers and psycopg is installed (the password never printed)."""
    try:
        import psycopg
    except ImportError:
        pr.add("storage.database", "needs psycopg: pip install 'dicom-node[postgresql]'")
        return
    try:
        psycopg.connect(url, connect_timeout=5).close()
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        pr.add("storage.database", f"cannot connect: {first}")


def _check_tls(tls: TLSSettings, path: str, pr: Problems, server: bool) -> None:
    files = [tls.cert, tls.key, tls.ca]
    for key, p in zip(("cert", "key", "ca"), files):
        if p is not None and not p.is_file():
            pr.add(join_path(path, key), f"file not found: {p}")
    files = [p for p in files if p is not None]
    complete = tls.cert is not None and tls.key is not None if server else bool(files)
    if complete and all(p.is_file() for p in files):
        # Load them now, as the node will: a key that does not match its certificate, a
        # password-protected key or a file that is not PEM is found by check-config.
        from dicom_node import tls as tls_module

        try:
            (tls_module.server_context if server else tls_module.client_context)(tls)
        except UserError as exc:
            pr.add(path, str(exc).removeprefix("tls: ").removeprefix("node.tls: "))


def _check_model(model: ModelSettings, path: str, pr: Problems, base_dir: Path) -> None:
    """A model file (relative to the config's folder) or a bundled model name such as ``default``."""
    if not model.path:
        return  # the schema reported it
    bare = Path(model.path)
    is_bare = bare.suffix == "" and len(bare.parts) == 1
    p = (base_dir / bare) if is_bare else bare
    if p.is_file():
        problem = style_model_file_problem(p)
        if problem:
            pr.add(path, f"{problem}: {p}")
        model.path = str(p)
        return
    if is_bare:
        from dicom_node.engine.model_paths import resolve_model_path

        if not resolve_model_path(model.path).is_file():
            pr.add(path, f"bundled model {model.path!r} not found (and no file {p})")
        return  # the engine resolves bundled names itself
    pr.add(path, f"file not found: {p}")


def style_model_file_problem(path: Path) -> str | None:
    """Cheap check that ``path`` is a style model: the safetensors header names our format.

    Reads only the JSON header (the weights are checked when the node loads the model).
    """
    import json
    import struct

    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "not a style model file (too short)"
            (size,) = struct.unpack("<Q", head)
            if size > 100 * 1024**2:
                return "not a style model file (no safetensors header)"
            header = json.loads(f.read(size).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return "not a style model file (no safetensors header)"
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != STYLE_MODEL_FORMAT:
        return "not a dicom-node style model (safetensors file without our metadata)"
    return None

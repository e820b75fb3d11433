"""Checks of a parsed node config against the machine it will run on (the schema's I/O half).

The spool is writable or can be created; the listener's and the console's TLS files exist and
load as the node will load them; the database answers; model files are style models (their
header only); each destination passes its kind's own check (:mod:`dicom_node.destinations`).
``check-config`` and ``serve`` run these after the schema (:func:`dicom_node.config.load_config`).
"""
from __future__ import annotations

from pathlib import Path

from dicom_node.engine.defaults import MODEL_FORMAT as STYLE_MODEL_FORMAT
from dicom_node.engine.yaml_config import Problems, join_path

from .probes import check_tls, check_writable
from .settings import ModelSettings, NodeConfig

__all__ = ["check_environment", "style_model_file_problem", "STYLE_MODEL_FORMAT"]


def check_environment(cfg: NodeConfig, base_dir: Path = Path(".")) -> list[str]:
    """Every environment problem of ``cfg`` as ``path: message``; may finish resolving model paths
    (a bare name such as ``default`` is a file in the config's folder when one exists there)."""
    # The kinds import this package's readers: the registry is imported when first needed, so
    # that either package can be imported first.
    from dicom_node.destinations import KINDS

    problems = Problems()
    if cfg.node.tls is not None:
        check_tls(cfg.node.tls, "node.tls", problems, server=True)
    if cfg.web is not None and cfg.web.tls is not None and cfg.web.tls is not cfg.node.tls:
        check_tls(cfg.web.tls, "web.tls", problems, server=True)
    if cfg.web is not None and cfg.web.stow_rs_client_ca is not None:
        _check_client_ca(cfg.web.stow_rs_client_ca, problems)
    check_writable(cfg.storage.spool_dir, "storage.spool_dir", problems)
    if cfg.storage.database is not None:
        _check_database(cfg.storage.database, problems)
    for name, model in cfg.models.items():
        _check_model(model, join_path(join_path("models", name), "path"), problems, Path(base_dir))
    for name, dest in cfg.destinations.items():
        kind = KINDS.get(dest.type)
        if kind is not None:
            kind.check(dest, join_path("destinations", name), problems)
    return problems.items


def _check_client_ca(ca: Path, problems: Problems) -> None:
    """``web.stow_rs.client_ca`` exists and loads as the web server will load it."""
    import ssl

    from dicom_node.errors import UserError
    from dicom_node.tls import _load_ca

    if not ca.is_file():
        problems.add("web.stow_rs.client_ca", f"file not found: {ca}")
        return
    try:
        _load_ca(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), ca)
    except UserError as exc:
        problems.add("web.stow_rs.client_ca", str(exc).removeprefix("tls: "))


def _check_database(url: str, problems: Problems) -> None:
    """The PostgreSQL server answers and psycopg is installed (the password never printed)."""
    try:
        import psycopg
    except ImportError:
        problems.add("storage.database", "needs psycopg: pip install 'dicom-node[postgresql]'")
        return
    try:
        psycopg.connect(url, connect_timeout=5).close()
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        problems.add("storage.database", f"cannot connect: {first}")


def _check_model(model: ModelSettings, path: str, problems: Problems, base_dir: Path) -> None:
    """A model file (relative to the config's folder) or a bundled model name such as ``default``."""
    if not model.path:
        return  # the schema reported it
    bare = Path(model.path)
    is_bare = bare.suffix == "" and len(bare.parts) == 1
    p = (base_dir / bare) if is_bare else bare
    if p.is_file():
        problem = style_model_file_problem(p)
        if problem:
            problems.add(path, f"{problem}: {p}")
        model.path = str(p)
        return
    if is_bare:
        from dicom_node.engine.model_paths import resolve_model_path

        if not resolve_model_path(model.path).is_file():
            problems.add(path, f"bundled model {model.path!r} not found (and no file {p})")
        return  # the engine resolves bundled names itself
    problems.add(path, f"file not found: {p}")


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

"""Live reconfiguration: what a reload may change at once, what needs a restart, and how
``dicom-node reload`` talks to the running node.

Why files and a signal: the node may run without its console, under another user's shell or
systemd; a signal (SIGHUP, what ``systemctl reload`` sends by convention) plus two small files
in the spool work everywhere.  ``dicom-node reload`` writes a request with a random id, sends
SIGHUP to the pid in ``node.json`` and waits for the result with that id; the node re-reads
*its own* config file, validates it completely, and applies it or keeps the old one.

Applied at once: routes (with their called AE titles, allow-lists, matching, completion and
fidelity settings), destinations, retry, models (a changed model is loaded beside the old one),
notifications, ``storage.min_free_bytes``, ``node.max_instance_bytes``.  Needs a restart (the
reload says so and keeps the old value): the listener (``node.*`` otherwise), the spool folder,
the console (``web``) and the number of ``workers``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

from dicom_node.config import NodeConfig

__all__ = ["NODE_FILE", "REQUEST_FILE", "RESULT_FILE", "read_config", "restart_needed", "applicable", "changes",
           "write_node_file", "read_node_file", "request_reload", "take_request", "write_result"]

NODE_FILE = "node.json"  # {pid, config, started_at} of the node using this spool
REQUEST_FILE = "reload-request"  # the id of the reload `dicom-node reload` asked for
RESULT_FILE = "reload-result.json"  # {id, ok, problems, changes, restart_needed, at}
LIVE_NODE_KEYS = ("max_instance_bytes",)


def read_config(path: str | Path) -> tuple[NodeConfig | None, list[str]]:
    """Read and validate the config a reload asks for: ``(config, [])`` or ``(None, problems)``.

    Never raises: whatever goes wrong while reading or validating (a config error, an unreadable
    file, or an exception nobody foresaw, such as a document that exhausts the stack) is a
    problem of this reload, one line each, and the node keeps serving its old config.
    """
    from dicom_node.config import ConfigError, load_config
    from dicom_node.errors import UserError

    try:
        return load_config(path), []
    except ConfigError as exc:
        return None, list(exc.problems)
    except UserError as exc:
        return None, [_one_line(str(exc))]
    except Exception as exc:  # noqa: BLE001 - a reload must never stop the node
        return None, [f"{path}: cannot be read as a config ({exc.__class__.__name__}: {_one_line(str(exc))})"]


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "no details"


def restart_needed(old: NodeConfig, new: NodeConfig) -> list[str]:
    """The changed settings a reload cannot apply, as ``section.key`` names."""
    out = [f"node.{f.name}" for f in dataclasses.fields(old.node)
           if f.name not in LIVE_NODE_KEYS and getattr(old.node, f.name) != getattr(new.node, f.name)]
    if old.storage.spool_dir != new.storage.spool_dir:
        out.append("storage.spool_dir")
    if old.web != new.web:
        out.append("web")
    if old.workers != new.workers:
        out.append("workers")
    return out


def applicable(old: NodeConfig, new: NodeConfig) -> NodeConfig:
    """``new`` with the settings that need a restart kept as they run now."""
    node = dataclasses.replace(old.node, **{k: getattr(new.node, k) for k in LIVE_NODE_KEYS})
    storage = dataclasses.replace(new.storage, spool_dir=old.storage.spool_dir)
    return dataclasses.replace(new, node=node, storage=storage, web=old.web, workers=old.workers)


def changes(old: NodeConfig, new: NodeConfig) -> list[str]:
    """What a reload from ``old`` to ``new`` changes, one line each (no secrets)."""
    out = []
    for kind, before, after in (("route", {r.name: r for r in old.routes}, {r.name: r for r in new.routes}),
                                ("destination", old.destinations, new.destinations),
                                ("model", old.models, new.models),
                                ("webhook", {w.name: w for w in old.notifications},
                                 {w.name: w for w in new.notifications})):
        out += [f"{kind} {n} added" for n in after if n not in before]
        out += [f"{kind} {n} removed" for n in before if n not in after]
        out += [f"{kind} {n} changed" for n in after if n in before and after[n] != before[n]]
    for label, a, b in (("retry", old.retry, new.retry), ("study_stable_seconds", old.study_stable_seconds,
                                                          new.study_stable_seconds),
                        ("storage.min_free_bytes", old.storage.min_free_bytes, new.storage.min_free_bytes),
                        ("node.max_instance_bytes", old.node.max_instance_bytes, new.node.max_instance_bytes)):
        if a != b:
            out.append(f"{label} changed")
    return out


# ----------------------------------------------------------------------------- the files


def _write(path: Path, text: str) -> None:
    from dicom_node.engine.atomic import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text), durable=False, mode=0o600)


def write_node_file(spool_root: Path, config_path: str | None) -> None:
    _write(Path(spool_root) / NODE_FILE, json.dumps({
        "pid": os.getpid(), "config": None if config_path is None else str(Path(config_path).resolve()),
        "started_at": time.time()}))


def read_node_file(spool_root: Path) -> dict[str, Any] | None:
    """The running node's {pid, config} or None (no file, or its process is gone)."""
    try:
        info = json.loads((Path(spool_root) / NODE_FILE).read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info


def take_request(spool_root: Path) -> str | None:
    """The id of the reload asked for (None: a plain SIGHUP), removing the request."""
    path = Path(spool_root) / REQUEST_FILE
    try:
        rid = path.read_text().strip()
        path.unlink()
    except OSError:
        return None
    return rid or None


def write_result(spool_root: Path, rid: str | None, result: dict[str, Any]) -> None:
    _write(Path(spool_root) / RESULT_FILE, json.dumps({"id": rid, "at": time.time(), **result}))


def request_reload(spool_root: Path, pid: int, timeout: float = 120.0) -> dict[str, Any] | None:
    """Ask the node ``pid`` to reload and wait for its answer (None: no answer in ``timeout``)."""
    rid = secrets.token_hex(8)
    _write(Path(spool_root) / REQUEST_FILE, rid)
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = json.loads((Path(spool_root) / RESULT_FILE).read_text())
            if result.get("id") == rid:
                return result
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    return None

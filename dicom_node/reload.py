"""Live reconfiguration: what a reload may change at once, what needs a restart, and how
``dicom-node reload`` talks to the running node.

Why files and a signal: the node may run without its console, under another user's shell or
systemd; a signal (SIGHUP, what ``systemctl reload`` sends by convention) plus two small files
in the spool work everywhere.  ``dicom-node reload`` writes a request with a random id, sends
SIGHUP to the pid in ``node.json`` and waits for the result with that id; the node re-reads
*its own* config file, validates it completely, and applies it or keeps the old one.

What a reload applies at once and what needs a restart is said once per setting, by its field
in :mod:`dicom_node.config.settings` (``LIVE`` / ``RESTART``); this module derives from it, for
every key, what changed, what was applied and what waits for a restart.  Applied at once today:
routes, destinations, models (a changed model is loaded beside the old one), notifications,
retry, ``study_stable_seconds``, ``storage.min_free_bytes``, ``storage.keep_sources_days``,
``node.max_instance_bytes``.  Needs a restart (the reload says so and keeps the old value): the
listener (``node.*`` otherwise), the spool folder, the state database and its lease length, the
console (``web``) and the number of ``workers``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any, Iterator

from dicom_node.config import NodeConfig
from dicom_node.config.settings import EACH_FIELD, LIVE, RELOAD, RESTART

__all__ = ["NODE_FILE", "REQUEST_FILE", "RESULT_FILE", "read_config", "Plan", "plan", "restart_needed", "applicable",
           "changes", "write_node_file", "read_node_file", "request_reload", "take_request", "write_result"]

NODE_FILE = "node.json"  # {pid, config, started_at} of the node using this spool
REQUEST_FILE = "reload-request"  # the id of the reload `dicom-node reload` asked for
RESULT_FILE = "reload-result.json"  # {id, ok, problems, changes, restart_needed, at}
_LIVE, _RESTART, _EACH_FIELD = LIVE[RELOAD], RESTART[RELOAD], EACH_FIELD[RELOAD]  # a setting's reload metadata


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


@dataclasses.dataclass
class Plan:
    """What a reload from one config to another does."""

    config: NodeConfig  # the new config, with the settings that need a restart kept as they run
    applied: list[str]  # one line per change applied at once (no secrets)
    restart_needed: list[str]  # the changed settings that wait for a restart, as ``section.key``

    @property
    def changed(self) -> bool:
        return bool(self.applied or self.restart_needed)


def plan(old: NodeConfig, new: NodeConfig) -> Plan:
    """The reload from ``old`` to ``new``, derived from each setting's ``reload`` metadata."""
    return Plan(applicable(old, new), changes(old, new), restart_needed(old, new))


def _how(f: dataclasses.Field[Any]) -> str:
    """``live``, ``restart`` or ``each field`` (a setting that does not say needs a restart)."""
    return str(f.metadata.get(RELOAD, _RESTART))


def _settings(old: Any, new: Any, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field[Any], Any, Any]]:
    """(``section.key``, field, old value, new value) of every setting, sections opened."""
    for f in dataclasses.fields(old):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if _how(f) == _EACH_FIELD:
            yield from _settings(a, b, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, a, b


def restart_needed(old: NodeConfig, new: NodeConfig) -> list[str]:
    """The changed settings a reload cannot apply, as ``section.key`` names."""
    return [key for key, f, a, b in _settings(old, new) if _how(f) != _LIVE and a != b]


def applicable(old: Any, new: Any) -> Any:
    """``new`` with the settings that need a restart kept as they run now."""
    kept = {}
    for f in dataclasses.fields(new):
        if _how(f) == _EACH_FIELD:
            kept[f.name] = applicable(getattr(old, f.name), getattr(new, f.name))
        elif _how(f) != _LIVE:
            kept[f.name] = getattr(old, f.name)
    return dataclasses.replace(new, **kept)


def changes(old: NodeConfig, new: NodeConfig) -> list[str]:
    """What a reload from ``old`` to ``new`` applies at once, one line each (no secrets): an item
    of a collection (a route, a destination, a model, a webhook) by name, other settings by key."""
    out = []
    for key, f, a, b in _settings(old, new):
        if _how(f) != _LIVE or a == b:
            continue
        kind = f.metadata.get("item")
        if kind is None:
            out.append(f"{key} changed")
            continue
        before, after = _by_name(a), _by_name(b)
        out += [f"{kind} {n} added" for n in after if n not in before]
        out += [f"{kind} {n} removed" for n in before if n not in after]
        out += [f"{kind} {n} changed" for n in after if n in before and after[n] != before[n]]
    return out


def _by_name(items: Any) -> dict[str, Any]:
    """A collection of settings by name (a dict already is; a list's items have ``name``)."""
    return dict(items) if isinstance(items, dict) else {item.name: item for item in items}


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
        info: dict[str, Any] = json.loads((Path(spool_root) / NODE_FILE).read_text())
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
            result: dict[str, Any] = json.loads((Path(spool_root) / RESULT_FILE).read_text())
            if result.get("id") == rid:
                return result
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    return None

"""Readiness: can this node take a study now and do something with it?

``GET /health/ready`` answers 200 only when every check holds, else 503 with each check's
result, so a load balancer or an orchestrator sends modalities elsewhere and a monitor says
what is wrong:

* ``listener``: the DICOM listener accepts associations (not for ``--role worker``);
* ``database``: the state database takes a write transaction (within ``DB_TIMEOUT``);
* ``spool``: the spool's disk has at least ``storage.min_free_bytes`` free (below it the
  listener refuses instances anyway);
* ``models``: every routed model is loaded (not for ``--role receive``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dicom_node.web.app import Console

__all__ = ["Check", "readiness", "DB_TIMEOUT"]

DB_TIMEOUT = 2.0  # seconds a write lock may take before the database counts as unavailable


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def readiness(console: Console) -> list[Check]:
    """Every readiness check of the node behind ``console`` (a :class:`dicom_node.web.app.Console`)."""
    config, spool = console.config, console.spool
    role = getattr(console, "role", "all")
    checks = []
    if role != "worker":
        checks.append(Check("listener", bool(console.listening()),
                            f"{config.node.host}:{config.node.port}" if console.listening() else "not listening"))
    from dicom_node.database import open_connection

    try:
        conn = open_connection(spool.database(config.storage.database), timeout=DB_TIMEOUT)
        try:
            conn.begin()
            conn.rollback()
        finally:
            conn.close()
        checks.append(Check("database", True, "writable"))
    except Exception as exc:  # noqa: BLE001 - sqlite3.Error, psycopg.Error: either way not ready
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        checks.append(Check("database", False, f"not writable: {first}"))
    free, minimum = spool.free_bytes(), config.storage.min_free_bytes
    checks.append(Check("spool", free >= minimum, f"{free} bytes free, storage.min_free_bytes {minimum}"))
    if role == "receive":
        return checks  # a receiving node loads no models
    routed = list(dict.fromkeys(r.model for r in config.routes))
    missing = [name for name in routed if not console.models.is_loaded(name)]
    if missing:
        why = "; ".join(f"{n}: {console.models.errors[n]}" if n in console.models.errors else f"{n}: loading"
                        for n in missing)
        checks.append(Check("models", False, f"not loaded: {why}"))
    else:
        checks.append(Check("models", True, f"{len(routed)} loaded"))
    return checks

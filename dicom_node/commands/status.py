"""``dicom-node status``: inspect the node's work (``dicom-node retry``: :mod:`.retry`).

Reads the state database in the configured spool directly (SQLite in WAL mode allows this
while the node runs).
"""
from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from . import add_config

if TYPE_CHECKING:
    from dicom_node.state import StateDB

FLAGGED_LISTED = 50  # the newest flagged outputs that status --json lists


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="counts per state, the oldest waiting item, flagged and withheld outputs, "
                                      "the nodes and what each holds",
                       description="What the node holds: instances and deliveries per state, backlog per "
                                   "destination, fidelity verdicts, withheld outputs, the nodes on the state "
                                   "database (up, late, or stopped within the hour) and the oldest waiting item. "
                                   "Reads the state database of the config's spool; the node may be running.")
    add_config(p)
    p.add_argument("--json", action="store_true", help="machine-readable output (for monitoring)")
    p.set_defaults(func=run_status)


def open_state(config_path: str | None) -> StateDB:
    """The state database of the spool that ``config_path`` (None: the embedded config) names,
    opened with the config's webhooks and lease length (as the node opens it)."""
    from dicom_node.config import load_config
    from dicom_node.errors import UserError
    from dicom_node.spool import node_spool
    from dicom_node.state import StateDB

    config = load_config(config_path)
    spool = node_spool(config)
    if config.storage.database is not None:
        return StateDB.for_config(config, config.storage.database)
    if not spool.db_path.is_file():
        raise UserError(f"no state database at {spool.db_path} (has the node run with this spool?)")
    return StateDB.for_config(config, spool.db_path)  # its webhooks: an operator's change raises events too


def cli_user() -> str:
    """Who an operator command is recorded as in the operator log: ``cli:<os user>``."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - no user name (containers): the uid
        import os

        return f"cli:uid{os.getuid()}"


def run_status(args: argparse.Namespace) -> int:
    from dicom_node.metrics import received_by_protocol

    db = open_state(args.config)
    try:
        inst, dels = db.counts()
        oldest = db.oldest_waiting()
        per_destination = db.destination_summary()
        fidelity = db.audit.fidelity_counts()
        withheld = db.audit.withheld()
        flagged = db.audit.rows(verdict="flagged", newest=FLAGGED_LISTED)
        nodes = db.cluster.nodes()
        received = received_by_protocol(db.counters.values())
    finally:
        db.close()
    if getattr(args, "json", False):
        import json

        print(json.dumps({
            "instances": inst, "deliveries": dels, "received": received,
            "destinations": {n: {"pending": p, "failed": f, "max_attempts_so_far": a, "last_error": e}
                             for n, p, f, a, e in per_destination},
            "oldest_waiting": None if oldest is None else
            {"what": oldest[0], "sop": oldest[1], "age_seconds": round(time.time() - oldest[2], 1)},
            "fidelity": {"outputs": fidelity, "withheld": withheld,
                         "flagged": [{k: r[k] for k in ("source_sop_uid", "output_sop_uid", "study_uid", "model",
                                                         "reasons", "scores", "disposition", "created_at")}
                                     for r in flagged]},
            "nodes": [{**n, "heartbeat_age_seconds": round(time.time() - n["heartbeat_at"], 1)} for n in nodes],
        }, indent=2))
        return 0
    print("instances:  " + "  ".join(f"{k} {v}" for k, v in inst.items()))
    for called, by_protocol in received.items():
        print(f"  received at {called}: " + "  ".join(f"{p} {n}" for p, n in by_protocol.items()))
    print("deliveries: " + "  ".join(f"{k} {v}" for k, v in dels.items()))
    for name, pending, failed, attempts, error in per_destination:
        line = f"  to {name}: pending {pending}  failed {failed}  (attempts up to {attempts})"
        print(line + (f"  last error: {error}" if error else ""))
    print("fidelity:   " + "  ".join(f"{k} {v}" for k, v in fidelity.items()))
    for item in withheld:
        print(f"  withheld {item['output_sop_uid']} (source {item['source_sop_uid']}, model {item['model']}, "
              f"{time.time() - item['since']:.0f} s): {'; '.join(item['reasons'])}")
    if withheld:
        print("  -> dicom-node release UID... | discard UID... (or --all)")
    print("nodes:" + ("" if nodes else "      none running, stopped within the hour or silent within a day"))
    for n in nodes:
        holds = ", ".join(f"{v} {k}" for k, v in n["holds"].items() if v) or "nothing"
        print(f"  {n['name']} ({n['role']}, {n['host']} pid {n['pid']}): {n['state']}, heartbeat "
              f"{time.time() - n['heartbeat_at']:.0f} s ago, holds {holds}"
              + (f"; models {', '.join(n['models'])}" if n["models"] else ""))
    if oldest is None:
        print("oldest waiting: none")
    else:
        what, uid, since = oldest
        print(f"oldest waiting: {what} sop {uid}, received {time.time() - since:.0f} s ago")
    return 0

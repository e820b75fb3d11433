"""``dicom-node retry``: requeue failed translations and deliveries.

Writes the state database in the configured spool directly (SQLite in WAL mode allows this
while the node runs); the running node picks requeued items up within a second.
"""
from __future__ import annotations

import argparse

from . import add_config


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    r = sub.add_parser("retry", help="requeue failed translations and deliveries",
                       description="Requeue every failed translation and every delivery given up (recorded in the "
                                   "operator log); the running node picks them up within a second.")
    add_config(r)
    r.set_defaults(func=run_retry)


def run_retry(args: argparse.Namespace) -> int:
    from .status import cli_user, open_state

    db = open_state(args.config)
    try:
        nd, ni = db.retry_failed(user=cli_user())
    finally:
        db.close()
    print(f"requeued {nd} failed deliveries and {ni} failed translations")
    return 0

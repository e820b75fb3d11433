"""``dicom-node reprocess --study UID [--route NAME]``: translate a delivered study again.

For a study the node delivered before a model was retrained and reloaded: its instances go back
to the translators, which read the sources kept in the spool (``storage.keep_sources_days``)
and deliver a new output version in the same series (new SOP Instance UIDs; see
:mod:`dicom_node.reprocessing`).  Writes the state database directly, like ``retry``; the
running node starts within a second.  Recorded in the operator log and, per output, in the
audit trail (``dicom-node audit``: output version, who asked, the model's digest).
"""
from __future__ import annotations

import argparse

from dicom_node.errors import UserError

from . import add_config


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("reprocess", help="translate a delivered study again (after a model change)",
                       description="Translate a delivered study again from its sources kept in the spool and "
                                   "deliver the new outputs (same series, new SOP Instance UIDs), e.g. after a "
                                   "model was retrained and reloaded.  Recorded in the operator log and the audit "
                                   "trail.  Sources are kept storage.keep_sources_days after delivery.")
    p.add_argument("--study", required=True, metavar="UID", help="the Study Instance UID (as 'dicom-node audit' "
                   "or the console shows it)")
    p.add_argument("--route", metavar="NAME", help="only this route's outputs (default: every route that "
                   "translated the study)")
    add_config(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dicom_node.config import load_config

    from .status import cli_user, open_state

    config = load_config(args.config)
    if args.route is not None and config.route(args.route) is None:
        raise UserError(f"--route {args.route!r}: no such route in the config "
                        f"({', '.join(r.name for r in config.routes)})")
    db = open_state(args.config)
    try:
        queued = db.sources.reprocess(args.study.strip(), args.route, user=cli_user(),
                                      configured=[r.name for r in config.routes])
    finally:
        db.close()
    for route, n in sorted(queued.items()):
        print(f"queued {n} instance{'s' if n != 1 else ''} of route {route} for translation again")
    return 0

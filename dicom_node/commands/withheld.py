"""``dicom-node release`` and ``dicom-node discard``: the operator's decision on withheld outputs.

A route with ``fidelity: {action: withhold}`` keeps each output the fidelity guard flagged in
the spool (``dicom-node status`` lists them).  ``release`` sends it after all (a radiologist
looked and found it faithful); ``discard`` drops it for good (the original still went out if
the route forwards originals).  Outputs are named by their output SOP UID, their source SOP
UID or their Study Instance UID (as ``status`` prints them), or ``--all``.  Both write the
state database directly (SQLite WAL); the running node sends released outputs within a second.
"""
from __future__ import annotations

import argparse

from dicom_node.errors import UserError

from . import add_config


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, verb in (("release", "send withheld outputs after all"),
                       ("discard", "drop withheld outputs (never sent)")):
        p = sub.add_parser(name, help=verb, description=f"{verb[0].upper()}{verb[1:]}: outputs the fidelity guard "
                           "flagged on a route with 'fidelity: {action: withhold}' (listed by 'dicom-node status').")
        p.add_argument("uids", nargs="*", metavar="UID",
                       help="output SOP UID, source SOP UID or Study Instance UID of withheld outputs")
        p.add_argument("--all", action="store_true", help="every withheld output")
        add_config(p)
        p.set_defaults(func=run, action=name)


def run(args: argparse.Namespace) -> int:
    from .status import cli_user, open_state

    if not args.uids and not args.all:
        raise UserError(f"name the withheld outputs to {args.action} (UIDs from 'dicom-node status'), or --all")
    if args.uids and args.all:
        raise UserError("give UIDs or --all, not both")
    db = open_state(args.config)
    try:
        decide = db.audit.release if args.action == "release" else db.audit.discard
        done = decide(args.uids, everything=args.all, user=cli_user())
    finally:
        db.close()
    if not done:
        raise UserError("no withheld output matches" + ("" if args.all else f": {' '.join(args.uids)}"))
    verb = "released" if args.action == "release" else "discarded"
    for uid in done:
        print(f"{verb} {uid}")
    print(f"{verb} {len(done)} withheld output{'s' if len(done) != 1 else ''}")
    return 0

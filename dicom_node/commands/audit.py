"""``dicom-node audit``: which model made which output from which source, and the guard's verdict.

One line per output from the node's audit trail (``dicom-node.audit_trail``): time, source
SOP UID, model name, version and weight digest, output SOP UID, fidelity verdict (with its
reasons) and what happened to the output.  Reads the state database directly.
"""
from __future__ import annotations

import argparse
import datetime as dt
import time

from dicom_node.errors import UserError

from . import add_config


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("audit", help="the audit trail: source -> model -> output -> fidelity verdict",
                       description="Print the node's audit trail, oldest first.")
    p.add_argument("--study", metavar="UID", help="only this Study Instance UID")
    p.add_argument("--since", metavar="T",
                   help="only outputs from this time on: an ISO date/time (2026-12-01, 2026-12-01T08:00, "
                        "UTC unless it names a zone) or an age such as 30m, 12h, 7d")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    add_config(p)
    p.set_defaults(func=run)


def parse_since(text: str, now: float | None = None) -> float:
    """Seconds since the epoch for ``--since``: an ISO time, or an age (``90s``, ``30m``, ``12h``, ``7d``)."""
    now = time.time() if now is None else now
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip()
    if t and t[-1].lower() in units and t[:-1].replace(".", "", 1).isdigit():
        return now - float(t[:-1]) * units[t[-1].lower()]
    try:
        when = dt.datetime.fromisoformat(t)
    except ValueError:
        raise UserError(f"--since {text!r}: not an ISO date/time (2026-12-01T08:00) or an age (30m, 12h, 7d)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


def run(args: argparse.Namespace) -> int:
    import json

    from .status import open_state

    since = parse_since(args.since) if args.since else None
    db = open_state(args.config)
    try:
        rows = db.audit.rows(study_uid=args.study, since=since)
    finally:
        db.close()
    for r in rows:
        if args.json:
            print(json.dumps({**r, "created": _iso(r["created_at"]), "updated": _iso(r["updated_at"])}))
            continue
        verdict = r["verdict"] + (f" ({'; '.join(r['reasons'])})" if r["reasons"] else "")
        version = (f"  version {r['output_version']} (reprocess by {r['requested_by']})"
                   if r.get("output_version", 1) > 1 else "")
        print(f"{_iso(r['created_at'])}  {r['source_sop_uid']} -> {r['model']} {r['model_version']} "
              f"[{r['model_digest'][:12]}] -> {r['output_sop_uid']}  {verdict}  {r['disposition']}{version}")
    if not args.json:
        print(f"{len(rows)} output{'s' if len(rows) != 1 else ''}")
    return 0

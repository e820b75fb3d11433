"""``dicom-node check-config [--config] FILE``: validate a node config before deploying it.

Prints every problem on its own line with its YAML path (so an operator fixes them all in
one go) and exits 1, or prints what the node would do — called AE -> model ->
destinations — and exits 0.
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from . import add_config

if TYPE_CHECKING:
    from dicom_node.config import DestinationSettings, NodeConfig


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check-config", help="validate a node config and print every problem",
                       description="Validate a node config before deploying it: every problem on its own line "
                                   "with its YAML path (exit 1), or what the node would do: called AE -> model -> "
                                   "destinations, the console, retries (exit 0). Reads model file headers only.")
    add_config(p, "node config YAML", positional=True, required=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dicom_node.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        print(f"{args.config}: {len(exc.problems)} problem(s)", file=sys.stderr)
        return 1
    unreachable = _reach(cfg)
    if unreachable:
        for problem in unreachable:
            print(problem)
        print(f"{args.config}: {len(unreachable)} problem(s)", file=sys.stderr)
        return 1
    for line in summary(cfg):
        print(line)
    return 0


def _reach(cfg: NodeConfig) -> list[str]:
    """Peers that do not answer now (each kind decides what reaching means; see DestinationKind.reach)."""
    from dicom_node.destinations import KINDS
    from dicom_node.engine.yaml_config import Problems, join_path

    problems = Problems()
    for name, dest in cfg.destinations.items():
        KINDS[dest.type].reach(dest, join_path("destinations", name), problems)
    return problems.items


def summary(cfg: NodeConfig) -> list[str]:
    """Human-readable lines describing a valid config (no secrets, no patient data)."""
    node = cfg.node
    tls = " TLS" + (" (client certificates required)" if node.tls.require_client_cert else "") if node.tls else ""
    lines = [
        f"{cfg.source}: OK",
        f"node {node.ae_title} listening on {node.host}:{node.port}{tls}, "
        f"spool {cfg.storage.spool_dir}, study stable after {cfg.study_stable_seconds:g} s",
        "routes:",
    ]
    for r in cfg.routes:
        model = cfg.models[r.model]
        dests = ", ".join(_describe_destination(cfg.destinations[d]) for d in r.destinations)
        extra = []
        if r.calling_ae:
            extra.append("from " + "/".join(r.calling_ae))
        for key, values in r.match.items():
            extra.append(f"{key} in {'/'.join(values)}")
        if r.forward_original:
            extra.append("+ original")
        extra.append(f"quiet {cfg.stable_seconds(r):g} s")
        if r.max_wait_seconds is not None:
            extra.append(f"max wait {r.max_wait_seconds:g} s then {r.on_max_wait}")
        suffix = f"  [{'; '.join(extra)}]" if extra else ""
        lines.append(f"  {r.name}: {r.called_ae} -> model {r.model} ({model.path}) -> {dests}{suffix}")
    lines.append(
        f"retry: up to {cfg.retry.max_attempts} attempts, backoff "
        + "/".join(f"{s:g}" for s in cfg.retry.backoff_seconds) + " s"
    )
    from dicom_node.notifications import receiver  # a path or query may hold a token: never printed

    for w in cfg.notifications:
        lines.append(f"webhook {w.name}: {receiver(w.url)} on {', '.join(w.events)}"
                     f"{', signed' if w.secret else ''}{', with patient data' if w.include_phi else ''}")
    web = cfg.web
    if web is None:
        lines.append("console: off (web: null)")
    else:
        who = f"users {', '.join(sorted(web.users))}" if web.users else "a login token printed at start"
        lines.append(f"console: {'https' if web.tls else 'http'}://{web.host}:{web.port}/ ({who}); "
                     "/metrics and /health/ready without login")
    return lines


def _describe_destination(dest: DestinationSettings) -> str:
    """``pacs (dicom PACS@10.0.0.5:104)``: the name, the kind and the kind's own description."""
    from dicom_node.destinations import describe

    return f"{dest.name} ({dest.type} {describe(dest)})"

"""``dicom-node reload [--config FILE]``: make the running node re-read its config (as SIGHUP does).

Exit 0 when the node applied it, 1 when the config is invalid (the node keeps the old one and
logs every problem; they are printed here too), no node runs on the config's spool, or the
node did not answer.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dicom_node.errors import UserError

from . import add_config

ANSWER_TIMEOUT = 120.0  # seconds: loading a changed model on a slow disk may take a while


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("reload", help="make the running node re-read its config (systemctl reload)",
                       description="Validates the config, asks the node on its spool to re-read it (SIGHUP) and "
                                   "prints what changed and what needs a restart.")
    add_config(p, "the node's config YAML (the file it was started with)", positional=True, required=True)
    p.set_defaults(func=run)


def _node_dir(config_path: str) -> Path:
    """The folder of this node in the spool the config names, even when the config has other problems."""
    from dicom_node.config.schema import parse_schema
    from dicom_node.engine.yaml_config import read_yaml_file

    path = Path(config_path)
    raw, _ = read_yaml_file(path)  # unreadable, not YAML or nested too deep: one line, the node is not asked
    try:
        cfg, _ = parse_schema(raw, base_dir=path.parent, source=str(path))
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - whatever breaks the validation, the running node is untouched
        raise UserError(f"{path}: cannot be read as a config ({exc.__class__.__name__})") from None
    from dicom_node.spool import node_spool

    return node_spool(cfg).node_dir


def run(args: argparse.Namespace) -> int:
    from dicom_node import reload

    spool = _node_dir(args.config)
    node = reload.read_node_file(spool)
    if node is None:
        raise UserError(f"no dicom-node is running on spool {spool} (start it, or check --config)")
    if node.get("config") != str(Path(args.config).resolve()):
        raise UserError(f"the node on {spool} runs {node.get('config') or 'the embedded default'}; "
                        "reload re-reads that file (edit it, then reload with --config pointing at it)")
    result = reload.request_reload(spool, int(node["pid"]), ANSWER_TIMEOUT)
    if result is None:
        raise UserError(f"the node (pid {node['pid']}) did not answer within {ANSWER_TIMEOUT:.0f} s; see its log")
    if not result["ok"]:
        print(f"dicom-node reload: the node keeps its old config; {len(result['problems'])} problem(s):",
              file=sys.stderr)
        for problem in result["problems"]:
            print(f"  {problem}", file=sys.stderr)
        return 1
    for line in result["changes"] or ["nothing changed"]:
        print(line)
    for key in result["restart_needed"]:
        print(f"{key} changed: needs a restart (systemctl restart dicom-node); the old value stays until then")
    return 0

"""``dicom-node serve [--config FILE]``: run the node until SIGTERM/SIGINT."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the DICOM node (receive, translate, forward)")
    p.add_argument("--config", help="node config YAML (default: the embedded loopback config)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dicom_node.config import load_config
    from dicom_node.node import Node

    config = load_config(args.config)
    Node(config).serve_forever()
    return 0

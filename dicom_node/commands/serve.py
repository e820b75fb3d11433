"""``dicom-node serve [--config FILE]``: run the node until SIGTERM/SIGINT."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the DICOM node (receive, translate, forward)")
    p.add_argument("--config", help="node config YAML (default: the embedded loopback config)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging
    import tempfile

    from dicom_node.config import load_config
    from dicom_node.node import Node
    from dicom_node.spool import Spool

    if not getattr(args, "verbose", False):
        # One line per node event; pynetdicom's per-PDU chatter only with -v.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    config = load_config(args.config)
    spool = Spool(config.storage.spool_dir)
    spool.lock()  # before touching tmp/: another node may be using this spool
    spool.open()
    # pynetdicom streams incoming datasets to temp files: put them on the spool's disk so
    # accepting one is a rename, and a small /tmp cannot refuse a large study.
    tempfile.tempdir = str(spool.tmp)
    Node(config, spool, config_path=args.config).serve_forever()
    return 0

"""``dicom-node serve [--config FILE]``: run the node until SIGTERM/SIGINT."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from . import add_config

if TYPE_CHECKING:
    from dicom_node.config import NodeConfig


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the DICOM node (receive, translate, forward)",
                       description="Run the node until SIGTERM or SIGINT (SIGHUP or 'dicom-node reload' re-reads "
                                   "the config). Without --config: the embedded default (DICOM on "
                                   "127.0.0.1:11112, console on 127.0.0.1:8080, the bundled model, a folder "
                                   "destination). Both ports are checked first: one in use is a one-line error.")
    add_config(p, "node config YAML (default: the embedded loopback config)")
    p.add_argument("--port", type=int, metavar="N",
                   help="the embedded config's DICOM port (default 11112; with --config: set node.port in FILE)")
    p.add_argument("--web-port", type=int, metavar="N",
                   help="the embedded config's console port (default 8080; with --config: set web.port in FILE)")
    p.add_argument("--role", choices=("all", "receive", "worker"), default="all",
                   help="all: receive, translate and deliver (default); receive: only the DICOM listener; worker: no "
                        "listener, translate and deliver from the shared queue (several nodes need "
                        "storage.database: postgresql://...)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging
    import tempfile

    from dicom_node.config import load_config
    from dicom_node.errors import UserError
    from dicom_node.node import Node
    from dicom_node.ports import check_ports
    from dicom_node.spool import node_spool

    if not getattr(args, "verbose", False):
        # One line per node event; pynetdicom's per-PDU chatter only with -v.
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    config = load_config(args.config)
    _embedded_ports(config, args)
    role = getattr(args, "role", "all")
    if role != "all" and config.storage.database is None:
        raise UserError(f"--role {role} needs a shared state database (storage.database: postgresql://...): "
                        "with SQLite in the spool one node does everything (--role all)")
    check_ports(config, role)  # before the spool is locked or anything is loaded or printed
    spool = node_spool(config)
    spool.lock()  # before touching tmp/: another node may be using this spool
    spool.open()
    # pynetdicom streams incoming datasets to temp files: put them on the spool's disk so
    # accepting one is a rename, and a small /tmp cannot refuse a large study.
    tempfile.tempdir = str(spool.tmp)
    Node(config, spool, config_path=args.config, role=role).serve_forever()
    return 0


def _embedded_ports(config: NodeConfig, args: argparse.Namespace) -> None:
    """``--port``/``--web-port`` (``make run PORT=... WEB_PORT=...``): other ports for the embedded
    config.  Not for a config file: a reload re-reads the file, whose ports would then differ."""
    from dicom_node.errors import UserError

    given = {flag: value for flag, value in (("--port", getattr(args, "port", None)),
                                             ("--web-port", getattr(args, "web_port", None))) if value is not None}
    if not given:
        return
    if args.config is not None:
        raise UserError(f"{' and '.join(given)} only change the embedded config's ports: with --config, "
                        "set node.port and web.port in the file")
    for flag, value in given.items():
        if not 1 <= value <= 65535:
            raise UserError(f"{flag} {value}: not a port (1-65535)")
    assert config.web is not None  # the embedded config serves the console
    config.node.port = given.get("--port", config.node.port)
    config.web.port = given.get("--web-port", config.web.port)
    if config.node.port == config.web.port:
        raise UserError(f"the DICOM listener and the console cannot share port {config.node.port}")

"""Are the node's ports free?  Asked once, before a start locks, opens, loads or prints anything.

Why a probe before the start: the DICOM listener and the console bind their sockets late
(after the spool, the state database and the workers), so a port in use used to show up after
a console login link and "model loaded" had been printed and a node row had been written (a
ghost "stopped" node in ``status``).  A probe bind with the listeners' own options
(``SO_REUSEADDR``, as pynetdicom and the console set it: a port in TIME_WAIT after a restart is
free) fails exactly where theirs would.  The listeners keep their own checks for the rare port
taken between the probe and their bind.
"""
from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from dicom_node.errors import UserError

if TYPE_CHECKING:
    from dicom_node.config import NodeConfig

__all__ = ["check_ports", "port_problem"]


def port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (``Address already in use``...), or None.

    Port 0 (the kernel picks one) is always free.
    """
    if not port:
        return None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        return exc.strerror or str(exc)
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def check_ports(config: NodeConfig, role: str = "all") -> None:
    """Raise one ``UserError`` naming every port of ``config`` that cannot be listened on.

    The DICOM port unless the node is a ``worker`` (no listener), the console's unless
    ``web: null``.  The wording is the listeners' own (``cannot listen on ...``, ``cannot serve
    the console on ...``).
    """
    problems = []
    node = config.node
    if role != "worker":
        why = port_problem(node.host, node.port)
        if why:
            problems.append(f"cannot listen on {node.host}:{node.port}: {why} "
                            "(set node.port; the embedded config: serve --port N, make run PORT=N)")
    web = config.web
    if web is not None:
        why = port_problem(web.host, web.port)
        if why:
            problems.append(f"cannot serve the console on {web.host}:{web.port}: {why} "
                            "(set web.port, or web: null to turn the console off; the embedded config: "
                            "serve --web-port N, make run WEB_PORT=N)")
    if problems:
        raise UserError("; ".join(problems))

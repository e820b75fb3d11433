"""The node's web side: operations console, Prometheus metrics, health checks (config ``web:``).

:class:`WebServer` runs uvicorn in one daemon thread of the node with its own event loop: the
DICOM listener's threads and the workers never wait for it, and its pages read the state
database on their own connection.  The socket is bound before the thread starts, so a port in
use stops the node at start with a one-line error, as the DICOM port does.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from dicom_node.config import WebSettings

__all__ = ["WebServer"]

log = logging.getLogger("dicom_node.web")

START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0


class WebServer:
    """Serves an ASGI app on ``settings.host:settings.port`` (port 0: the kernel picks one)."""

    def __init__(self, settings: WebSettings, app: Any) -> None:
        self.settings = settings
        self.app = app
        self.address: tuple[str, int] | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self.address is not None, "web server not started"
        host, port = self.address
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.settings.tls else 'http'}://{host}:{port}"

    def start(self) -> tuple[str, int]:
        import uvicorn

        from dicom_node.errors import UserError
        from dicom_node.web.client_certs import TLSScopeProtocol, web_context

        host, port = self.settings.host, self.settings.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise UserError(f"cannot serve the console on {host}:{port}: {exc.strerror or exc} "
                            "(set web.port, or web: null to turn the console off)") from None
        sock.setblocking(False)
        self.address = sock.getsockname()[:2]
        # uvicorn's own loggers only for problems; no access log (paths name studies)
        logging.getLogger("uvicorn").setLevel(logging.WARNING)
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        # proxy_headers off: uvicorn would believe X-Forwarded-For from 127.0.0.1 (its default),
        # which lets anyone on the host pick an address per login; the app believes it only from
        # web.trusted_proxies (dicom_node.web.auth.client_address)
        # http: uvicorn's h11 protocol that also puts the client certificate into the scope (ASGI
        # TLS extension), for STOW-RS clients that authenticate by certificate (web.stow_rs.client_ca)
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2, server_header=False, proxy_headers=False,
                                http=TLSScopeProtocol)
        config.load()
        if self.settings.tls is not None:
            config.ssl = web_context(self.settings)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="web",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self._server.started:
            raise RuntimeError("the console's web server did not start")
        return self.address

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT)
        self._server = None

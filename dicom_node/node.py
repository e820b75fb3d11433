"""The node: wires spool, state database, listener and worker threads; start and stop.

Start order matters for recovery: the spool and database are opened (and partial writes
dropped) before the listener accepts anything, and the workers start from whatever the
database says is unfinished, so a restart after kill -9 resumes every acknowledged item.
Stop order is the reverse: stop accepting, let each worker finish its current item, close
the database.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from dicom_node.config import NodeConfig
from dicom_node.metrics import NodeMetrics
from dicom_node.scp import StoreSCP
from dicom_node.spool import Spool
from dicom_node.state import StateDB
from dicom_node.worker import Broadcast, Claims, Deliverer, Housekeeper, ModelCache, Translator

__all__ = ["Node"]

log = logging.getLogger("dicom_node.node")

DELIVERY_GRACE = 5.0  # seconds a delivery in progress may take to finish at stop
CONSOLE_TOKEN_FILE = "console-token"  # in the spool: the console's login token of this start (0600)


class Node:
    """A running dicom-node (listener + workers) for one config."""

    def __init__(self, config: NodeConfig, spool: Spool | None = None) -> None:
        self.config = config
        self.spool = spool or Spool(config.storage.spool_dir)
        self.db: StateDB | None = None
        self.scp: StoreSCP | None = None
        self.address: tuple[str, int] | None = None
        self._stop = threading.Event()
        self._translate_wake = threading.Event()
        self._deliver_wake: Broadcast = Broadcast([])
        self._threads: list[threading.Thread] = []
        self.metrics = NodeMetrics()
        self.web: Any = None  # dicom_node.web.WebServer while the console runs
        self._web_db: StateDB | None = None

    @property
    def port(self) -> int:
        assert self.address is not None, "node not started"
        return self.address[1]

    def start(self) -> tuple[str, int]:
        """Open the spool, resume unfinished work, start the workers and the listener."""
        self.spool.lock()
        self.spool.open()
        self.db = StateDB(self.spool.db_path)
        named = self.db.name_routes([r.name for r in self.config.routes])
        if named:
            log.info("state database: %d row(s) now name their route (they named its position before)", named)
        inst, dels = self.db.counts()
        unfinished = inst["received"] + inst["ready"] + inst["translated"]
        if unfinished or dels["pending"]:
            log.info("resuming: %d received, %d ready, %d translated instance(s), %d pending deliveries",
                     inst["received"], inst["ready"], inst["translated"], dels["pending"])
        models = ModelCache(self.config, self.spool)
        claims = Claims()
        deliverers = [Deliverer(self.config, self.spool, self.db, threading.Event(), self._stop, only=name)
                      for name in [*self.config.destinations, None]]
        self._deliver_wake = Broadcast([d.wake for d in deliverers])
        for i in range(max(1, int(self.config.workers))):
            self._threads.append(Translator(self.config, self.spool, self.db, models, self._translate_wake,
                                            self._stop, self._deliver_wake, f"translator-{i}", claims,
                                            metrics=self.metrics))
        self._threads.extend(deliverers)
        self._threads.append(Housekeeper(self.config, self.spool, self.db, self._stop))
        if self.config.web is not None:
            self._start_web(models)  # before the workers: a console port in use stops the start cleanly
        for t in self._threads:
            t.start()
        self.scp = StoreSCP(self.config, self.spool, self.db, on_received=self._wake_all, metrics=self.metrics)
        self.address = self.scp.start()
        return self.address

    def _start_web(self, models: ModelCache) -> None:
        """The console, metrics and health checks, on their own database connection."""
        from dicom_node.engine.atomic import atomic_write
        from dicom_node.web import WebServer
        from dicom_node.web.app import Console, build_app
        from dicom_node.web.auth import Sessions, new_token

        web = self.config.web
        self._web_db = StateDB(self.spool.db_path)
        self.metrics.watch(self._web_db, self.spool, self.config)
        token = None if web.users else new_token()
        console = Console(config=self.config, spool=self.spool, db=self._web_db, models=models, metrics=self.metrics,
                          listening=lambda: self.scp is not None and self.scp.listening, wake=self._wake_all,
                          token=token, sessions=Sessions(web.session_minutes * 60.0))
        try:
            self.web = WebServer(web, build_app(console))
            self.web.start()
        except BaseException:
            self._web_db.close()
            self._web_db = None
            self.db.close()
            self.spool.unlock()
            raise
        url = self.web.url
        if token is not None:
            token_file = self.spool.root / CONSOLE_TOKEN_FILE
            atomic_write(token_file, lambda tmp: Path(tmp).write_text(token + "\n"), durable=False, mode=0o600)
            log.info("console on %s/ - log in with %s/login?token=%s (also in %s)", url, url, token, token_file)
        else:
            log.info("console on %s/ (users: %s)", url, ", ".join(sorted(web.users)))
        if web.tls is None and web.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("console on %s without TLS: passwords and patient data cross the network in clear "
                        "(set web.tls)", url)

    def _wake_all(self) -> None:
        """A new instance: the translator checks its timers, deliverers pick up forwarded originals."""
        self._translate_wake.set()
        self._deliver_wake.set()

    def stop(self, timeout: float = 20.0) -> None:
        """Stop accepting, let workers finish their current item, close the database."""
        if self.scp is not None:
            self.scp.stop()
            self.scp = None
        if self.web is not None:
            self.web.stop()
            self.web = None
        if self._web_db is not None:
            self._web_db.close()
            self._web_db = None
        self._stop.set()
        self._translate_wake.set()
        self._deliver_wake.set()
        start = time.monotonic()
        for t in self._threads:
            # A translator finishes its item; a deliverer stuck on a silent peer is abandoned
            # after DELIVERY_GRACE (its batch stays pending and is resent after the restart).
            limit = timeout if isinstance(t, Translator) else min(timeout, DELIVERY_GRACE)
            t.join(max(0.0, start + limit - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            log.warning("stopping with %s still busy (their items resume at the next start)", ", ".join(alive))
        elif self.db is not None:
            self.db.close()
        self.spool.unlock()
        self._threads = []
        log.info("stopped")

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then stop cleanly."""
        stop_requested = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            log.info("signal %s: stopping after the current item", signal.Signals(signum).name)
            stop_requested.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not stop_requested.wait(1.0):
                pass
        finally:
            self.stop()
            for s, h in previous.items():
                signal.signal(s, h)

    def __enter__(self) -> "Node":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

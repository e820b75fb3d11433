"""The node: wires spool, state database, listener and worker threads; start and stop.

Start order matters for recovery: the spool and database are opened (and partial writes
dropped) before the listener accepts anything, and the workers start from whatever the
database says is unfinished, so a restart after kill -9 resumes every acknowledged item.
Stop order is the reverse: stop accepting, abandon a translation in progress (its item stays
ready: :mod:`dicom_node.interrupt`), let a delivery finish, give back the leases, close the
database.

Roles (``serve --role``): ``all`` receives, translates and delivers; ``receive`` only answers
C-STOREs (several such nodes behind one DNS name or virtual IP); ``worker`` has no listener and
translates and delivers what any node received (GPU machines).  Nodes of any role share one
PostgreSQL database and one spool (:mod:`dicom_node.cluster`).
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dicom_node import reload
from dicom_node.cluster import ROLES, Heartbeat, new_node_id, node_name
from dicom_node.config import NodeConfig
from dicom_node.delivery import Deliverer
from dicom_node.housekeeping import Housekeeper
from dicom_node.ingest import Ingest
from dicom_node.loops import Broadcast, Loop
from dicom_node.metrics import NodeMetrics
from dicom_node.model_cache import ModelCache
from dicom_node.notifications import Notifier
from dicom_node.outbox import Events
from dicom_node.ports import check_ports
from dicom_node.scp import StoreSCP
from dicom_node.spool import Spool, node_spool
from dicom_node.state import StateDB
from dicom_node.translator import Translator

if TYPE_CHECKING:
    from dicom_node.web import WebServer
    from dicom_node.web.app import Console


class Configurable(Protocol):
    """A part of the node that takes a reloaded config."""

    def configure(self, config: NodeConfig) -> object: ...

__all__ = ["Node"]

log = logging.getLogger("dicom_node.node")

DELIVERY_GRACE = 5.0  # seconds a delivery in progress may take to finish at stop
CONSOLE_TOKEN_FILE = "console-token"  # in the spool: the console's login token of this start (0600)


class Node:
    """A running dicom-node (listener + workers) for one config."""

    def __init__(self, config: NodeConfig, spool: Spool | None = None, config_path: str | None = None,
                 role: str = "all") -> None:
        assert role in ROLES, role
        self.config = config
        self.role = role
        self.name = node_name(config)
        self.node_id = new_node_id(self.name)
        self.config_path = config_path  # the file a reload re-reads (None: the embedded default)
        self.spool = spool or node_spool(config)
        self.db: StateDB | None = None
        self.events = Events.from_config(config)  # the webhooks: shared by the node's database connections
        self.scp: StoreSCP | None = None
        self.ingest: Ingest | None = None  # the store path of the listener and STOW-RS ingest
        self.address: tuple[str, int] | None = None
        self._stop = threading.Event()
        self._translate_wake = threading.Event()
        self._deliver_wake: Broadcast = Broadcast([])
        self._threads: list[Loop] = []
        self.metrics = NodeMetrics()
        self.web: WebServer | None = None  # while the console runs
        self._web_db: StateDB | None = None
        self._console: Console | None = None
        self._models: ModelCache | None = None
        self._deliverers: dict[str | None, Deliverer] = {}
        self._reload_lock = threading.Lock()
        self._started = False  # True once start() finished: a start that failed leaves no node row

    @property
    def port(self) -> int:
        assert self.address is not None, "node not started"
        return self.address[1]

    def start(self) -> tuple[str, int] | None:
        """Open the spool, resume unfinished work, start the workers and the listener (none for
        a ``worker``: returns None)."""
        check_ports(self.config, self.role)  # before anything is locked, started or printed
        # Imported here, before any thread starts: the deliverers' and the listener's first
        # imports of pydicom at the same moment failed with "cannot import name 'UID' from
        # partially initialized module 'pydicom.uid'" (exit 2 at start, seen once in
        # test_node_recovery) now that the spool no longer imports pydicom at load.
        import pynetdicom  # noqa: F401 - imports pydicom whole

        self.spool.lock()
        self.spool.open()
        self.db = StateDB.for_config(self.config, self.spool.database(self.config.storage.database),
                                     events=self.events)
        freed = self.db.cluster.register_node(node_id=self.node_id, name=self.name, role=self.role,
                                              exclusive=self.spool.node is None)
        if freed:
            log.info("took back %d item(s) that an earlier start of this node had claimed", freed)
        named = self.db.name_routes([r.name for r in self.config.routes])
        if named:
            log.info("state database: %d row(s) now name their route (they named its position before)", named)
        inst, dels = self.db.counts()
        unfinished = inst["received"] + inst["ready"] + inst["translated"]
        if unfinished or dels["pending"]:
            log.info("resuming: %d received, %d ready, %d translated instance(s), %d pending deliveries",
                     inst["received"], inst["ready"], inst["translated"], dels["pending"])
        models = self._models = ModelCache(self.config, self.spool)
        if self.role != "receive":  # translators, deliverers and the notifier work the queue
            self._deliverers = {name: self._deliverer(name) for name in [*self.config.destinations, None]}
            deliverers = list(self._deliverers.values())
            self._deliver_wake = Broadcast([d.wake for d in deliverers])
            for i in range(max(1, int(self.config.workers))):
                self._threads.append(Translator(self.config, self.spool, self.db, models, self._translate_wake,
                                                self._stop, self._deliver_wake, f"translator-{i}",
                                                metrics=self.metrics))
            self._threads.extend(deliverers)
            self._threads.append(Notifier(self.config, self.db, self._stop))
        self._threads.append(Housekeeper(self.config, self.spool, self.db, self._stop))
        self._threads.append(Heartbeat(self.db.cluster, self._stop, lambda: list(models.loaded)))
        if self.role != "worker":
            self.ingest = Ingest(self.config, self.spool, self.db, on_received=self._wake_all)
        if self.config.web is not None:
            self._start_web(models)  # before the workers: a console port in use stops the start cleanly
        for t in self._threads:
            t.start()
        if self.role != "worker":
            self.scp = StoreSCP(self.config, self.spool, self.db, on_received=self._wake_all, metrics=self.metrics,
                                ingest=self.ingest)
            self.address = self.scp.start()
        else:
            log.info("worker %s ready: translating and delivering from the shared queue (no DICOM listener)",
                     self.name)
        reload.write_node_file(self.spool.node_dir, self.config_path)
        self._started = True
        return self.address

    def _deliverer(self, name: str | None) -> Deliverer:
        assert self.db is not None, "node not started"
        return Deliverer(self.config, self.spool, self.db, threading.Event(), self._stop, only=name)

    # -- live reconfiguration -------------------------------------------------------------
    def reload(self) -> dict[str, Any]:
        """Re-read the config file, validate it completely, apply what can be applied now.

        Returns ``{ok, problems, changes, restart_needed}``.  An invalid config, or a model that
        does not load, changes nothing: the node keeps serving the old config and logs why.
        """
        with self._reload_lock:
            if self.config_path is None:
                problem = "this node runs the embedded default config (started without --config): nothing to re-read"
                log.warning("reload: %s", problem)
                return {"ok": False, "problems": [problem], "changes": [], "restart_needed": []}
            new, problems = reload.read_config(self.config_path)  # never raises
            if new is None:
                for problem in problems:
                    log.error("reload refused, still running the old config: %s", problem)
                return {"ok": False, "problems": problems, "changes": [], "restart_needed": []}
            plan = reload.plan(self.config, new)  # what is live and what needs a restart: config.settings
            try:
                # first: the one part that may refuse (a model that does not load keeps the old config)
                loaded = self._models.configure(plan.config) if self._models is not None else []
            except Exception as exc:  # noqa: BLE001 - a model that does not load: keep the old config
                problem = f"a model cannot be loaded: {exc.__class__.__name__}: {exc}"
                log.error("reload refused, still running the old config: %s", problem)
                return {"ok": False, "problems": [problem], "changes": [], "restart_needed": plan.restart_needed}
            done = plan.applied + [f"model {n} loaded" for n in loaded if f"model {n} added" not in plan.applied]
            self._apply(plan.config)
            for key in plan.restart_needed:
                log.warning("reload: %s changed: needs a restart (the old value stays until then)", key)
            log.info("reloaded %s: %s", self.config_path, "; ".join(done) or "nothing changed")
            return {"ok": True, "problems": [], "changes": done, "restart_needed": plan.restart_needed}

    def _parts(self) -> list[Configurable]:
        """Every part that takes a reloaded config, each by ``configure(config)`` (the model cache
        goes first, in :meth:`reload`, since it may refuse; a retired deliverer finishes its batch
        with the config it had)."""
        parts: list[Configurable] = [t for t in self._threads if not t.retired]
        return parts + [p for p in (self.scp, self._console, self.metrics, self.events) if p is not None]

    def _apply(self, config: NodeConfig) -> None:
        """Hand ``config`` to every part; new destinations get a deliverer, removed ones' retire."""
        self.config = config
        for name in [n for n in self._deliverers if n is not None and n not in config.destinations]:
            self._deliverers.pop(name).retire()
        for name in config.destinations:
            if name not in self._deliverers:
                d = self._deliverers[name] = self._deliverer(name)
                self._threads.append(d)
                self._deliver_wake.events.append(d.wake)
                d.start()
        for part in self._parts():
            part.configure(config)
        self._wake_all()

    def _start_web(self, models: ModelCache) -> None:
        """The console, metrics and health checks, on their own database connection."""
        from dicom_node.engine.atomic import atomic_write
        from dicom_node.web import WebServer
        from dicom_node.web.app import Console, build_app
        from dicom_node.web.auth import Sessions, new_token

        web = self.config.web
        assert web is not None, "the console is configured"
        self._web_db = StateDB.for_config(self.config, self.spool.database(self.config.storage.database),
                                          events=self.events)
        self.metrics.watch(self._web_db, self.spool, self.config)
        token = None if web.users else new_token()
        console = self._console = Console(config=self.config, spool=self.spool, db=self._web_db, models=models, metrics=self.metrics,
                          listening=lambda: self.scp is not None and self.scp.listening, wake=self._wake_all,
                          token=token, sessions=Sessions(web.session_minutes * 60.0), role=self.role,
                          node_id=self.node_id, ingest=self.ingest)
        try:
            self.web = WebServer(web, build_app(console))
            self.web.start()
        except BaseException:
            self._web_db.close()
            self._web_db = None
            raise  # stop() closes the rest
        url = self.web.url
        if token is not None:
            token_file = self.spool.node_dir / CONSOLE_TOKEN_FILE
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
            # A translator abandons its translation within one tensor operation (the item stays
            # ready for the next start); a deliverer stuck on a silent peer is abandoned
            # after DELIVERY_GRACE (its batch stays pending and is resent after the restart),
            # as is a notification to a silent receiver.
            limit = timeout if isinstance(t, Translator) else min(timeout, DELIVERY_GRACE)
            if t.ident is not None:  # a start that failed half-way never started some
                t.join(max(0.0, start + limit - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            log.warning("stopping with %s still busy (their items resume at the next start, or on another node "
                        "when the lease ends)", ", ".join(alive))
        elif self.db is not None:
            try:
                self.db.cluster.node_stopped(forget=not self._started)  # the others take over its claims at once
            except Exception as exc:  # noqa: BLE001 - the database is away: the leases simply expire
                log.warning("could not give back this node's claims (%s): they pass to the others after %gs",
                            exc.__class__.__name__, self.config.storage.lease_seconds)
            self.db.close()
        (self.spool.node_dir / reload.NODE_FILE).unlink(missing_ok=True)
        self.spool.unlock()
        self._threads = []
        log.info("stopped")

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then stop cleanly; SIGHUP reloads the config."""
        stop_requested, woken = threading.Event(), threading.Event()
        reload_requested = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            if signum == signal.SIGHUP:
                reload_requested.set()
            else:
                log.info("signal %s: stopping (a translation in progress resumes at the next start)",
                         signal.Signals(signum).name)
                stop_requested.set()
            woken.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            self.start()
            while not stop_requested.is_set():
                woken.wait(1.0)
                woken.clear()
                if reload_requested.is_set() and not stop_requested.is_set():
                    reload_requested.clear()
                    rid = reload.take_request(self.spool.node_dir)
                    reload.write_result(self.spool.node_dir, rid, self.reload())
        finally:
            self.stop()
            for s, h in previous.items():
                signal.signal(s, h)

    def __enter__(self) -> "Node":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

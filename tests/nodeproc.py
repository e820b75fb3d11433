"""Test helpers for the node: run ``dicom-node serve`` as a subprocess, a receiving SCP, a sender.

Why a subprocess: kill -9 and SIGTERM must hit a real process, exactly as in production,
and a restart must recover only from what is on disk.  Everything listens on 127.0.0.1
with ports chosen by the kernel (bind port 0), so parallel test runs do not clash.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import yaml

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def free_port() -> int:
    """A port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refusing_port() -> socket.socket:
    """A socket bound to a loopback port and not listening: a connection to its port is refused,
    and no one else (the node's own listener on port 0 included) can take that port until it is
    closed.  A port from :func:`free_port` left unused can be taken by anyone meanwhile."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    return s


DATABASE_URL: str | None = None  # set by tests.postgres.both_backends: storage.database of node_config


def node_config(tmp: Path, *, port: int, model_path: Path, destinations: dict[str, Any],
                routes: list[dict[str, Any]], stable: float = 0.5, **extra: Any) -> dict[str, Any]:
    """A node config dict for tests: tiny model 'tiny', fast retries, spool under ``tmp``."""
    cfg: dict[str, Any] = {
        "node": {"ae_title": "TESTNODE", "host": "127.0.0.1", "port": port, "max_associations": 8,
                 "network_timeout": 10, "dimse_timeout": 10, "acse_timeout": 10},
        "storage": {"spool_dir": str(tmp / "spool"), "min_free_bytes": 0,
                    **({"database": DATABASE_URL} if DATABASE_URL else {})},
        "study_stable_seconds": stable,
        "models": {"tiny": {"path": str(model_path), "device": "cpu"}},
        "destinations": destinations,
        "routes": routes,
        "retry": {"max_attempts": 20, "backoff_seconds": [0.3]},
        "web": None,  # no console unless a test asks (web={"port": 0})
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class NodeProcess:
    """``python -m dicom_node serve --config FILE [--role R]`` in a subprocess, log to a file."""

    def __init__(self, config_path: Path, port: int, log_path: Path, role: str = "all") -> None:
        self.config_path, self.port, self.log_path = Path(config_path), port, Path(log_path)
        self.role = role
        self.proc: subprocess.Popen | None = None
        self._offset = 0

    def launch(self) -> "NodeProcess":
        """Start the process without waiting (several nodes start side by side: :meth:`wait_ready`)."""
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "dicom_node", "serve", "--config", str(self.config_path),
                                      "--role", self.role], stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        return self

    def start(self, timeout: float = 60.0) -> "NodeProcess":
        return self.launch().wait_ready(timeout)

    def wait_ready(self, timeout: float = 60.0) -> "NodeProcess":
        """Until the node listens (a worker: says it is ready)."""
        assert self.proc is not None
        offset, ready = self._offset, "ready: translating" if self.role == "worker" else "listening on"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log()[offset:]}")
            if ready in self.log()[offset:]:
                return self
            time.sleep(0.05)
        self.kill9()
        raise RuntimeError(f"node did not start listening within {timeout}s:\n{self.log()[offset:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def __enter__(self) -> "NodeProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.kill9()


class Receiver:
    """A pynetdicom storage SCP standing in for a PACS: records every dataset it receives."""

    def __init__(self, ae_title: str = "PACS", port: int | None = None, status: int = 0x0000,
                 delay: float = 0.0) -> None:
        self.ae_title = ae_title
        self.port = port or 0
        self.status = status
        self.delay = delay  # seconds before each answer: a slow PACS keeps work in flight for tests
        self.received: list[Any] = []  # pydicom Datasets, in arrival order (duplicates included)
        self._lock = threading.Lock()
        self._server: Any = None

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            self.received.append(ds)
        return self.status

    def start(self) -> "Receiver":
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

        ae = AE(ae_title=self.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = self._server.server_address[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def uids(self) -> list[str]:
        with self._lock:
            return [str(ds.SOPInstanceUID) for ds in self.received]

    def __enter__(self) -> "Receiver":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def send(port: int, datasets: Iterable[Any], *, called: str, calling: str = "MODALITY",
         tls_context: Any = None, native_only: bool = False) -> list[int | None]:
    """C-STORE each dataset over one association; returns the status per dataset (None: no answer).

    ``native_only`` proposes only the datasets' own transfer syntax (else uncompressed too).
    """
    from pynetdicom import AE

    datasets = list(datasets)
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 15
    native = str(datasets[0].file_meta.TransferSyntaxUID)
    syntaxes = [native] if native_only else list(dict.fromkeys([native, "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]))
    for sop in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
        ae.add_requested_context(sop, syntaxes)
    tls_args = (tls_context, None) if tls_context is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls_args)
    if not assoc.is_established:
        raise ConnectionError(f"association not established (rejected={assoc.is_rejected})")
    statuses: list[int | None] = []
    try:
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            statuses.append(int(rsp.Status) if rsp and "Status" in rsp else None)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def associate_result(port: int, *, called: str, calling: str = "MODALITY") -> Any:
    """Try an association with only Verification; returns the (released) Association object."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if assoc.is_established:
        assoc.release()
    return assoc


def folder_uids(root: Path) -> list[str]:
    """SOP Instance UIDs of every DICOM file below ``root`` (one entry per file)."""
    import pydicom

    out = []
    for p in sorted(Path(root).rglob("*.dcm")):
        out.append(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID))
    return out


def wait_for(predicate, timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds passed; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return bool(value)
        time.sleep(interval)

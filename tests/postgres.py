"""A real PostgreSQL server for tests: Debian's ``postgresql`` package, ``initdb`` and ``pg_ctl``
in a temporary folder, run as the ``postgres`` user (the server refuses root), listening on a
free loopback port, removed afterwards.  Each test gets a database of its own.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.conftest import INTEROP
from tests.peers import free_port, wait_for_port


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _as_postgres(args: list[str], **kw) -> subprocess.CompletedProcess:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run(prefix + args, capture_output=True, text=True, timeout=120, **kw)


class PostgresServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.port = free_port()

    def start(self) -> "PostgresServer":
        initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
        if initdb is None or pg_ctl is None:
            if INTEROP:
                pytest.fail("PostgreSQL (initdb, pg_ctl) is required when DICOM_NODE_INTEROP=1")
            pytest.skip("PostgreSQL server not installed")
        try:
            import psycopg  # noqa: F401
        except ImportError:
            if INTEROP:
                pytest.fail("psycopg is required when DICOM_NODE_INTEROP=1 (pip install -e '.[test]')")
            pytest.skip("psycopg not installed")
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self.pg_ctl = pg_ctl
        done = _as_postgres([initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr[-1000:]}")
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=on"
        done = _as_postgres([pg_ctl, "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"),
                             "-w", "start"])
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {done.stderr[-1000:]}")
        wait_for_port(self.port, timeout=30)
        return self

    def stop(self) -> None:
        _as_postgres([self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def start_again(self) -> None:
        """Start the stopped server on the same folder and port."""
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root}"
        done = _as_postgres([self.pg_ctl, "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"),
                             "-w", "start"])
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {done.stderr[-1000:]}")

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="session")
def postgres_server():
    import tempfile

    # not under pytest's folders: those are private to root, and the server runs as postgres
    root = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
    server = PostgresServer(root)
    try:
        yield server.start()
    finally:
        if hasattr(server, "pg_ctl"):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def both_backends(request, monkeypatch):
    """Run a node test on each state database: nodeproc.node_config adds storage.database."""
    from tests import nodeproc

    if request.param == "postgresql":
        monkeypatch.setattr(nodeproc, "DATABASE_URL", request.getfixturevalue("postgres_server").new_database())
    return request.param

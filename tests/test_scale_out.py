"""Several nodes on one PostgreSQL queue, as separate processes: two receivers, two workers.

Real parts only: a PostgreSQL server of the test's own (it is stopped on purpose), dcmtk
``storescu`` as the modalities sending to both receivers, dcmtk ``storescp`` as the PACS, and
kill -9 of a receiver while it receives and of a worker while it translates.  Every instance
a sender saw acknowledged must arrive as exactly one Secondary Capture (by SOP Instance UID).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pydicom
import pytest

from dicom_node.state import StateDB
from tests.nodeproc import send
from tests.peers import NodeProcess, StoreSCP, acknowledged_sop_uids, storescu, wait_until
from tests.postgres import PostgresServer
from tests.test_node_recovery import assert_no_phi, make_study, slow_model_path  # noqa: F401 - fixture

LEASE = 3.0  # seconds: a dead node's work passes on quickly in the test (production: 30)
CALLED = "DR_KIM_STYLE"


def cluster_config(tmp_path: Path, url: str, model: Path, pacs: StoreSCP, name: str) -> dict:
    return {
        "node": {"name": name, "ae_title": "DICOMNODE", "max_associations": 8, "network_timeout": 20,
                 "dimse_timeout": 20, "acse_timeout": 20},
        "storage": {"spool_dir": str(tmp_path / "shared-spool"), "database": url, "lease_seconds": LEASE,
                    "min_free_bytes": 0},
        "study_stable_seconds": 1.0,
        "models": {"slow": {"path": str(model), "device": "cpu", "tile": 0}},
        "destinations": {"pacs": {"type": "dicom", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                                  "port": pacs.port}},
        "routes": [{"called_ae": CALLED, "model": "slow", "destinations": ["pacs"]}],
        "retry": {"max_attempts": 50, "backoff_seconds": [0.5]},
        "web": None,
    }


def write_files(folder: Path, datasets: list) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        paths.append(folder / f"{i:03d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def held_by(url: str, name: str) -> list[str]:
    """SOP Instance UIDs a node of that name has claimed right now (it is translating them)."""
    db = StateDB(url)
    try:
        return [str(r[0]) for r in db.database.query("SELECT sop_uid FROM instances WHERE state='ready' AND "
                                                     "lease_owner LIKE ?", (f"{name}.%",))]
    finally:
        db.close()


def freeze_while_translating(node: NodeProcess, url: str, timeout: float = 90.0) -> list[str]:
    """SIGSTOP ``node`` at a moment it holds a claim (what it holds is then certain); returns those UIDs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        wait_until(lambda: held_by(url, node.workdir.name), deadline - time.monotonic(), interval=0.005,
                   message=f"{node.workdir.name} translating")
        os.kill(node.proc.pid, signal.SIGSTOP)
        held = held_by(url, node.workdir.name)
        if held:
            return held
        os.kill(node.proc.pid, signal.SIGCONT)  # it finished in between: try the next one
    raise AssertionError(f"{node.workdir.name} never caught translating")


def instance_count(url: str) -> int:
    db = StateDB(url)
    try:
        return sum(db.counts()[0].values())
    finally:
        db.close()


def at_pacs(pacs: StoreSCP) -> dict[str, set[str]]:
    """Source SOP Instance UID -> SC SOP Instance UIDs that the PACS holds for it."""
    out: dict[str, set[str]] = {}
    for f in pacs.files():
        sc = pydicom.dcmread(f, stop_before_pixels=True)
        out.setdefault(str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID), set()).add(str(sc.SOPInstanceUID))
    return out


def start_all(nodes: list[NodeProcess]) -> None:
    for n in nodes:
        n.launch()
    for n in nodes:
        n.wait_ready(90)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_two_receivers_and_two_workers_survive_kill9_of_each_and_a_database_outage(tmp_path, slow_model_path):
    root = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
    server = PostgresServer(root).start()  # a server of its own: this test stops it
    pacs = StoreSCP(tmp_path / "pacs", ae_title="PACS").start()
    nodes: list[NodeProcess] = []
    try:
        url = server.new_database()

        def make(name: str, role: str) -> NodeProcess:
            node = NodeProcess(tmp_path / name, cluster_config(tmp_path, url, slow_model_path, pacs, name), role=role)
            nodes.append(node)
            return node

        r1, r2 = make("r1", "receive"), make("r2", "receive")
        w1, w2 = make("w1", "worker"), make("w2", "worker")
        start_all(nodes)

        # 1. Two modalities send one study each, to both receivers; r1 is killed mid-association.
        big, small = make_study(30, 160), make_study(10, 160)
        big_files, small_files = write_files(tmp_path / "big", big), write_files(tmp_path / "small", small)
        results: dict[str, subprocess.CompletedProcess] = {}
        senders = [threading.Thread(target=lambda k, f, p: results.__setitem__(k, storescu(f, p, CALLED)),
                                    args=(k, f, p)) for k, f, p in (("r1", big_files, r1.port),
                                                                     ("r2", small_files, r2.port))]
        for t in senders:
            t.start()
        wait_until(lambda: instance_count(url) >= 10, 60, interval=0.005, message="instances received")
        r1.kill()
        for t in senders:
            t.join(120)
        acked_r1 = acknowledged_sop_uids(results["r1"].stdout + results["r1"].stderr, big_files)
        acked_r2 = acknowledged_sop_uids(results["r2"].stdout + results["r2"].stderr, small_files)
        assert 0 < len(acked_r1) < len(big), "the kill must interrupt r1's association"
        assert len(acked_r2) == len(small)
        # the modality fails over to the other receiver (as behind a virtual IP) and resends all
        resent = storescu(big_files, r2.port, CALLED)
        assert acknowledged_sop_uids(resent.stdout + resent.stderr, big_files) == {str(d.SOPInstanceUID) for d in big}

        # 2. A worker is killed while it translates; the other takes its item over after the lease.
        interrupted = freeze_while_translating(w1, url)
        w1.kill()
        everything = {str(d.SOPInstanceUID) for d in big + small}
        wait_until(lambda: set(at_pacs(pacs)) == everything, 180, message="all 40 at the PACS after the kills")
        assert interrupted and all(f"sop ...{uid[-8:]} translated" in w2.log_text() for uid in interrupted)

        # 3. The killed nodes come back; PostgreSQL stops for a few seconds during a study.
        start_all([r1, w1])
        during = make_study(4, 160)
        server.stop()
        assert send(r1.port, during[:2], called=CALLED) == [0xA700, 0xA700]  # never Success while away
        assert send(r2.port, during[2:], called=CALLED) == [0xA700, 0xA700]
        time.sleep(LEASE)  # longer than a lease: every node's heartbeat fails meanwhile
        server.start_again()
        wait_until(lambda: send(r1.port, during[:2], called=CALLED) == [0, 0], 60, interval=0.5,
                   message="r1 storing again")
        wait_until(lambda: send(r2.port, during[2:], called=CALLED) == [0, 0], 60, interval=0.5,
                   message="r2 storing again")
        everything |= {str(d.SOPInstanceUID) for d in during}
        wait_until(lambda: set(at_pacs(pacs)) == everything, 120, message="the outage study at the PACS")

        by_source = at_pacs(pacs)
        assert all(len(sc) == 1 for sc in by_source.values()), "exactly one SC per source instance"
        status = subprocess.run([sys.executable, "-m", "dicom_node", "status", "--json", "--config",
                                 str(r2.config_path)], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        up = {(n["name"], n["role"]) for n in json.loads(status.stdout)["nodes"] if n["state"] == "up"}
        assert up == {("r1", "receive"), ("r2", "receive"), ("w1", "worker"), ("w2", "worker")}  # all resumed
        db = StateDB(url)
        try:
            inst, dels = db.counts()
        finally:
            db.close()
        assert inst["delivered"] == len(everything) and dels["pending"] == 0, (inst, dels)
        for n in nodes:
            assert_no_phi(n.log_text())
    finally:
        for n in nodes:
            n.kill()
        pacs.stop()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)

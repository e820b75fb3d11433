"""Crash safety of ``dicom-node serve`` as a real subprocess: kill -9, SIGTERM, restart.

The promise tested: every instance the node acknowledged (C-STORE status 0x0000) is, after
any number of kill -9 and restarts, delivered exactly once per SOP Instance UID: one
Secondary Capture per acknowledged source, the same output UID every time.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node.state import StateDB
from tests.factory import CR_STORAGE as CR_STORAGE_UID
from tests.factory import PATIENT_ID, PATIENT_NAME, make_dataset
from tests.nodeproc import NodeProcess, Receiver, free_port, node_config, send, wait_for, write_config
from tests.postgres import both_backends, postgres_server  # noqa: E402,F401 - fixtures

pytestmark = pytest.mark.usefixtures("both_backends")  # every test on SQLite and on PostgreSQL

@pytest.fixture(scope="module")
def slow_model_path(tmp_path_factory):
    """Bigger than the tiny model so a translation takes long enough to be interrupted."""
    from dicom_node.engine import new_style_model, save_style_model

    path = tmp_path_factory.mktemp("models") / "slow.safetensors"
    save_style_model(new_style_model(ngf=8, n_blocks=2, seed=2), path, name="slow", version="1")
    return path


def make_study(n: int, size: int) -> list:
    study_uid, series_uid = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = make_dataset(rows=size, cols=size, study_uid=study_uid, series_uid=series_uid, seed=i)
        ds.InstanceNumber = i + 1
        out.append(ds)
    return out


def start_node(tmp_path: Path, model: Path, pacs_port: int, *, stable: float) -> NodeProcess:
    port = free_port()
    cfg = node_config(tmp_path, port=port, model_path=model, stable=stable,
                      destinations={"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                                             "port": pacs_port},
                                    "outbox": {"type": "folder", "path": str(tmp_path / "outbox")}},
                      routes=[{"called_ae": "DR_KIM_STYLE", "model": "tiny", "destinations": ["pacs", "outbox"]}])
    path = write_config(tmp_path / "node.yaml", cfg)
    return NodeProcess(path, port, tmp_path / "node.log").start()


def db_counts(tmp_path: Path) -> tuple[dict, dict]:
    from tests import nodeproc

    db = StateDB(nodeproc.DATABASE_URL or tmp_path / "spool" / "state.db")  # the node's state database
    try:
        return db.counts()
    finally:
        db.close()


def all_done(tmp_path: Path, n: int) -> bool:
    inst, dels = db_counts(tmp_path)
    return inst["delivered"] == n and dels["pending"] == 0


def settled(tmp_path: Path) -> bool:
    """Something was received and nothing is unfinished."""
    inst, dels = db_counts(tmp_path)
    unfinished = inst["received"] + inst["ready"] + inst["translated"] + dels["pending"]
    return sum(inst.values()) > 0 and unfinished == 0


def outputs_by_source(folder: Path) -> dict[str, set[str]]:
    """Source SOP Instance UID -> the SC SOP Instance UIDs found for it in the folder."""
    out: dict[str, set[str]] = {}
    for p in folder.rglob("*.dcm"):
        sc = pydicom.dcmread(p, stop_before_pixels=True)
        out.setdefault(str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID), set()).add(str(sc.SOPInstanceUID))
    return out


def kill_while_sending(node: NodeProcess, tmp_path: Path, acked: list[str], done: threading.Event, total: int,
                       *, acked_within: float, sender_within: float, settled_within: float) -> set[str]:
    """kill -9 ``node`` once a sender thread has had 12 of ``total`` instances acknowledged (into
    ``acked``; ``done`` set when it stops), check that the kill cut the sending short and that
    nothing was processed yet, restart it and wait until everything settled.  Returns the
    instances acknowledged before the kill."""
    assert wait_for(lambda: len(acked) >= 12, acked_within, interval=0.005)
    node.kill9()  # in the middle of the sending
    done.wait(sender_within)
    assert 12 <= len(acked) < total, "the kill must interrupt the sending"
    acked_at_kill = set(acked)
    inst, _ = db_counts(tmp_path)
    assert inst["delivered"] == 0  # killed before the study was quiet: nothing processed yet
    node.start()
    assert wait_for(lambda: settled(tmp_path), settled_within), node.log()[-3000:]
    return acked_at_kill


def assert_each_acknowledged_delivered_once(tmp_path: Path, pacs: Receiver, acked_at_kill: set[str],
                                            sources: list) -> dict[str, set[str]]:
    """Every instance acknowledged before the kill was translated and delivered, each source
    once, and the PACS got no duplicate; returns the outputs by source."""
    by_source = outputs_by_source(tmp_path / "outbox")
    assert acked_at_kill <= set(by_source)  # every acknowledged instance translated and delivered
    assert set(by_source) <= {str(ds.SOPInstanceUID) for ds in sources}
    assert all(len(v) == 1 for v in by_source.values())  # one SC per source, one file each
    uids = pacs.uids()
    assert sorted(uids) == sorted(set(uids)), "no duplicate sends"
    return by_source


def assert_no_phi(log: str) -> None:
    assert PATIENT_NAME not in log and "SECRET" not in log
    assert PATIENT_ID not in log


def test_kill9_while_receiving_then_restart_delivers_every_acknowledged_once(tmp_path, tiny_model_path):
    with Receiver("PACS") as pacs:
        node = start_node(tmp_path, tiny_model_path, pacs.port, stable=1.5)
        try:
            sources = make_study(30, 64)
            acked: list[str] = []
            done = threading.Event()

            def sender() -> None:
                from pynetdicom import AE

                ae = AE(ae_title="MODALITY")
                ae.add_requested_context(str(sources[0].SOPClassUID), "1.2.840.10008.1.2.1")
                try:
                    for start in range(0, len(sources), 5):  # several associations, like a modality
                        assoc = ae.associate("127.0.0.1", node.port, ae_title="DR_KIM_STYLE")
                        if not assoc.is_established:
                            return
                        for ds in sources[start:start + 5]:
                            rsp = assoc.send_c_store(ds)
                            if not rsp or "Status" not in rsp:
                                return
                            if int(rsp.Status) == 0:
                                acked.append(str(ds.SOPInstanceUID))
                        assoc.release()
                finally:
                    done.set()

            t = threading.Thread(target=sender, daemon=True)
            t.start()
            acked_at_kill = kill_while_sending(node, tmp_path, acked, done, len(sources),
                                               acked_within=30, sender_within=20, settled_within=60)
        finally:
            node.kill9()
        by_source = assert_each_acknowledged_delivered_once(tmp_path, pacs, acked_at_kill, sources)
        assert set(pacs.uids()) == {u for v in by_source.values() for u in v}
        assert_no_phi(node.log())


def test_kill9_then_sigterm_while_processing_then_restart_delivers_exactly_once(tmp_path, slow_model_path):
    """kill -9 mid-delivery, restart, SIGTERM mid-delivery, restart: every SC delivered, once per UID.

    The PACS answers slowly, so an association is reliably in flight when the test strikes
    (it watches the PACS receive files).  One test for both interruptions keeps the suite
    fast: every node start costs seconds.
    """
    n = 8
    with Receiver("PACS", delay=0.25) as pacs:
        node = start_node(tmp_path, slow_model_path, pacs.port, stable=0.2)
        try:
            sources = make_study(n, 192)
            assert send(node.port, sources, called="DR_KIM_STYLE") == [0] * n

            assert wait_for(lambda: len(pacs.received) >= 2, 60, interval=0.01)
            node.kill9()
            at_kill = len(pacs.received)
            assert at_kill < n, "the kill must interrupt the work"

            node.start()  # resumes; SIGTERM as soon as it is delivering again
            assert wait_for(lambda: len(pacs.received) > at_kill, 60, interval=0.01)
            assert db_counts(tmp_path)[0]["delivered"] < n, "the node must be busy when signalled"
            t0 = time.monotonic()
            assert node.terminate(timeout=20) == 0
            assert time.monotonic() - t0 < 10, "SIGTERM must stop the node within seconds"
            assert node.log().count("stopped") == 1
            # SIGTERM lets the batch in flight finish, which may complete the study: the
            # second restart has work to resume only if some was left.
            left = not all_done(tmp_path, n)

            node.start()
            assert wait_for(lambda: all_done(tmp_path, n), 90)
            time.sleep(0.5)
        finally:
            node.kill9()
        by_source = outputs_by_source(tmp_path / "outbox")
        assert set(by_source) == {str(ds.SOPInstanceUID) for ds in sources}
        assert all(len(v) == 1 for v in by_source.values())  # re-translation gave the same UIDs
        expected = {u for v in by_source.values() for u in v}
        uids = pacs.uids()
        assert set(uids) == expected
        # Only files of the association in flight at the kill can arrive twice (same UIDs):
        # the node records a batch's outcome when the batch ends.  SIGTERM lets it finish.
        assert len(uids) - len(expected) <= at_kill
        assert node.log().count("resuming:") == (2 if left else 1)
        assert_no_phi(node.log())


def peak_rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def settled_peak_rss_kb(pid: int, quiet: float = 1.0, limit: float = 30.0) -> int:
    """The peak RSS once start-up (model preload) stops raising it for ``quiet`` seconds: a fixed
    sleep took the baseline too early on a loaded machine (45 MB of start-up counted)."""
    deadline, last = time.monotonic() + limit, peak_rss_kb(pid)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = peak_rss_kb(pid)
        if now == last:
            return now
        last = now
    return last


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_large_instance_is_streamed_to_disk_not_held_in_memory(tmp_path, tiny_model_path):
    """An 80 MB instance is acknowledged without the node's memory growing by its size."""
    import numpy as np
    from pynetdicom import AE, _config

    from tests.factory import write

    pixels = np.random.default_rng(0).integers(0, 4095, size=(6400, 6400), dtype=np.uint16)
    big = Path(write(make_dataset(pixels), tmp_path / "big.dcm"))
    del pixels
    with Receiver("PACS") as pacs:
        node = start_node(tmp_path, tiny_model_path, pacs.port, stable=600)
        try:
            before = settled_peak_rss_kb(node.proc.pid)
            previous = _config.STORE_SEND_CHUNKED_DATASET
            _config.STORE_SEND_CHUNKED_DATASET = True  # the sender streams from disk too
            try:
                ae = AE(ae_title="MODALITY")
                ae.add_requested_context(CR_STORAGE_UID, "1.2.840.10008.1.2.1")
                ae.dimse_timeout = ae.network_timeout = 120
                assoc = ae.associate("127.0.0.1", node.port, ae_title="DR_KIM_STYLE")
                status = assoc.send_c_store(big)
                assoc.release()
            finally:
                _config.STORE_SEND_CHUNKED_DATASET = previous
            assert int(status.Status) == 0
            growth_mb = (peak_rss_kb(node.proc.pid) - before) / 1024
            assert growth_mb < 40, f"peak RSS grew by {growth_mb:.0f} MB for an 80 MB instance"
            spooled = list((tmp_path / "spool" / "in").rglob("*.dcm"))
            assert len(spooled) == 1 and abs(spooled[0].stat().st_size - big.stat().st_size) < 1024  # new file meta
        finally:
            node.kill9()


def test_sigterm_during_a_long_translation_stops_at_once_and_the_item_resumes(tmp_path):
    """SIGTERM while a 1024 x 1024 image is being translated (~5 s here with ngf 16 / 4 blocks):
    the node stops within 3 s with exit 0, the item is neither translated nor failed (it
    stays ready, its claim given back), and the next start translates and delivers it once.
    Before, the stop waited for the translation (20 s at most, then the process died with
    "terminate called without an active exception")."""
    from dicom_node.engine import new_style_model, save_style_model

    model = save_style_model(new_style_model(ngf=16, n_blocks=4, residual=True, seed=3),
                             tmp_path / "slow.safetensors", name="slow", version="1")
    with Receiver("PACS") as pacs:
        node = start_node(tmp_path, model, pacs.port, stable=0.2)
        try:
            source = make_study(1, 1024)
            assert send(node.port, source, called="DR_KIM_STYLE") == [0]
            assert wait_for(lambda: "ready for translation" in node.log(), 30, interval=0.01)
            time.sleep(0.05)  # claimed in the same step as this log line; the translation takes seconds
            t0 = time.monotonic()
            assert node.terminate(timeout=30) == 0
            stop_seconds = time.monotonic() - t0
            log = node.log()
            assert "terminate called" not in log and "Traceback" not in log
            inst, dels = db_counts(tmp_path)
            assert (inst["ready"], inst["translated"], inst["failed"], inst["delivered"]) == (1, 0, 0, 0), inst
            assert stop_seconds < 3.0, f"the stop waited {stop_seconds:.1f} s for the translation"
            assert "interrupted by the stop" in log

            node.start()
            assert wait_for(lambda: all_done(tmp_path, 1), 60)
        finally:
            node.kill9()
    assert [len(v) for v in outputs_by_source(tmp_path / "outbox").values()] == [1]
    assert len(pacs.uids()) == 1
    assert "failed" not in node.log().split("resuming:")[-1]


@pytest.mark.parametrize("tile", [0, 128])
def test_a_stop_interrupts_the_whole_image_pass_and_the_tiled_executor(tile, tiny_model):
    """The translator's stop guard sees the tiled executor's functional convolutions too."""
    import numpy as np

    from dicom_node.engine import translate
    from dicom_node.interrupt import TranslationStopped, stop_between_operations

    stop = threading.Event()
    image = np.zeros((512, 512), np.float32)
    with stop_between_operations(stop):
        assert translate(tiny_model, image, tile=tile).shape == image.shape  # unset: runs as always
    stop.set()
    with pytest.raises(TranslationStopped), stop_between_operations(stop):
        translate(tiny_model, image, tile=tile)

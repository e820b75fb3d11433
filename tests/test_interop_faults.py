"""Breaking things on purpose with real peers: the PACS goes down, the node is killed -9.

Why: the promise of the node is "nothing acknowledged is ever lost, nothing is delivered
twice".  These tests take Orthanc away in the middle of a study and kill the node process
with SIGKILL while it receives and while it forwards, then check Orthanc, by SOP Instance
UID, for exactly one Secondary Capture per acknowledged source instance.
"""
from __future__ import annotations

import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from tests.conftest import require_tool
from tests.factory import make_dataset, phantom, write
from tests.peers import (
    NodeProcess,
    Orthanc,
    acknowledged_sop_uids,
    echoscu,
    storescu,
    tiny_node_config,
    wait_until,
)

pytestmark = pytest.mark.interop

CALLED = "DR_KIM_STYLE"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc-faults"))
    pacs.start()
    yield pacs
    pacs.stop()


def make_study(folder: Path, count: int, rows: int = 96, cols: int = 80) -> tuple[str, list[Path]]:
    """``count`` uncompressed CR files of one new study (one series)."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    pixels = phantom(rows, cols, 12, seed=3)
    files = []
    for i in range(count):
        ds = make_dataset(pixels, study_uid=study, series_uid=series)
        ds.InstanceNumber = i + 1
        files.append(Path(write(ds, folder / f"{i:03d}.dcm")))
    return study, files


def sc_references(orthanc: Orthanc, study_uid: str) -> list[tuple[str, str]]:
    """(SC SOP Instance UID, referenced source SOP Instance UID) for each SC of the study."""
    sid = orthanc.find_study(study_uid)
    if sid is None:
        return []
    pairs = []
    for inst in orthanc.get(f"/studies/{sid}/instances"):
        tags = orthanc.instance_tags(inst["ID"])
        refs = tags.get("SourceImageSequence") or [{}]
        pairs.append((tags["SOPInstanceUID"], refs[0].get("ReferencedSOPInstanceUID")))
    return pairs


def assert_exactly_once(orthanc: Orthanc, study_uid: str, must_arrive: set[str], may_arrive: set[str]) -> None:
    """Every UID in ``must_arrive`` has exactly one SC at Orthanc; no SC for anything else."""
    pairs = sc_references(orthanc, study_uid)
    per_source = Counter(src for _, src in pairs)
    assert not [s for s, n in per_source.items() if n > 1], "a source has more than one SC"
    assert len({sc for sc, _ in pairs}) == len(pairs)
    assert must_arrive <= set(per_source), f"{len(must_arrive - set(per_source))} acknowledged instance(s) lost"
    assert set(per_source) <= may_arrive, "an SC references an instance that was never sent"


def node_for(tmp_path: Path, model: Path, orthanc: Orthanc, **kw) -> NodeProcess:
    pacs = {"pacs": {"type": "dicom", "ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}}
    return NodeProcess(tmp_path / "node", tiny_node_config(model, pacs, **kw))


def test_pacs_down_during_study_then_back(orthanc, tmp_path, tiny_model_path):
    study, files = make_study(tmp_path / "study", 8)
    node = node_for(tmp_path, tiny_model_path, orthanc, stable=0.5, backoff=[0.5, 1.0]).start()
    try:
        first = storescu(files[:4], node.port, CALLED)
        assert first.returncode == 0, first.stderr[-2000:]
        orthanc.stop()  # the PACS goes away in the middle of the study
        second = storescu(files[4:], node.port, CALLED)
        assert second.returncode == 0, second.stderr[-2000:]
        acked = acknowledged_sop_uids(first.stdout + first.stderr, files) | acknowledged_sop_uids(
            second.stdout + second.stderr, files)
        assert len(acked) == 8
        # The node translates, tries to deliver, fails, and keeps the work for a retry.
        wait_until(lambda: node.count_log("to retry") >= 2, timeout=60,
                   message=f"failed delivery attempts\n{node.log_tail()}")
        orthanc.start()
        wait_until(lambda: len(sc_references(orthanc, study)) >= 8, timeout=60,
                   message=f"delivery after the PACS came back\n{node.log_tail()}")
        assert_exactly_once(orthanc, study, acked, acked)
        assert echoscu(node.port, CALLED).returncode == 0
    finally:
        node.stop()
        if orthanc.proc is None:
            orthanc.start()


def test_kill9_while_receiving_then_restart(orthanc, tmp_path, tiny_model_path):
    """SIGKILL after a few instances were stored, while storescu is still sending."""
    exe = require_tool("storescu")
    study, files = make_study(tmp_path / "study", 40, rows=512, cols=512)
    node = node_for(tmp_path, tiny_model_path, orthanc, stable=2.0).start()
    try:
        sender = subprocess.Popen([exe, "-v", "-aet", "CR_ROOM1", "-aec", CALLED, "127.0.0.1", str(node.port),
                                   *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_until(lambda: node.count_log("received sop") >= 5 or sender.poll() is not None, timeout=60,
                   interval=0.01, message="the first instances to arrive")
        node.kill()
        out, _ = sender.communicate(timeout=60)
        acked = acknowledged_sop_uids(out, files)
        assert 3 <= len(acked) < len(files), f"kill did not land mid-association ({len(acked)} acked)"
        assert sender.returncode != 0

        node.start()  # same spool, same port: resumes
        wait_until(lambda: len(sc_references(orthanc, study)) >= len(acked), timeout=90,
                   message=f"{len(acked)} SC after restart\n{node.log_tail()}")
        time.sleep(1.5)  # anything extra (a duplicate) would show up now
        sent = {str(p) for p in files}
        import pydicom

        all_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in sent}
        assert_exactly_once(orthanc, study, acked, all_uids)
    finally:
        node.stop()


def test_kill9_while_forwarding_then_restart(orthanc, tmp_path, tiny_model_path):
    """SIGKILL as soon as the first SC reached Orthanc, with more still to translate/send."""
    study, files = make_study(tmp_path / "study", 12, rows=256, cols=224)
    node = node_for(tmp_path, tiny_model_path, orthanc, stable=0.5).start()
    try:
        res = storescu(files, node.port, CALLED)
        assert res.returncode == 0, res.stderr[-2000:]
        acked = acknowledged_sop_uids(res.stdout + res.stderr, files)
        assert len(acked) == len(files)
        wait_until(lambda: node.count_log("delivered") >= 1, timeout=90, interval=0.01,
                   message=f"a first delivery\n{node.log_tail()}")
        node.kill()
        at_kill = len(sc_references(orthanc, study))
        assert 1 <= at_kill < len(files), f"kill did not land mid-forwarding ({at_kill} delivered)"

        node.start()
        wait_until(lambda: len(sc_references(orthanc, study)) >= len(files), timeout=90,
                   message=f"all SC after restart\n{node.log_tail()}")
        time.sleep(1.5)
        assert_exactly_once(orthanc, study, acked, acked)
        assert "resuming" in node.log_text()
    finally:
        node.stop()

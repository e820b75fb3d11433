"""Destinations: C-STORE to a real pynetdicom SCP on 127.0.0.1, and the folder destination.

Why: delivery is where data gets lost.  These tests pin that every file gets an honest
result (never an exception for network trouble), that compressed files reach a peer that
only takes uncompressed data, that warning statuses count as delivered, and that the
folder destination is atomic, idempotent and cannot be steered outside its folder.
"""
from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage

from dicom_node.config import DestinationSettings
from dicom_node.destinations import deliver, valid_uid
from tests.conftest import require_tool
from tests.factory import CR_STORAGE, make_dataset, write

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


class SCP:
    """A storage SCP in this process that records what it received and how."""

    def __init__(self, contexts: dict[str, list[str]], *, status: int = 0x0000, ae_title: str = "PACS",
                 abort_after: int | None = None, timeout: float = 5, delay: float = 0.0) -> None:
        self.received: list[tuple[str, str, pydicom.Dataset]] = []  # (SOP UID, transfer syntax, dataset)
        self.status = status
        self.abort_after = abort_after
        self.delay = delay
        ae = AE(ae_title)
        ae.require_called_aet = True
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = timeout
        for sop, syntaxes in contexts.items():
            ae.add_supported_context(sop, syntaxes)
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = self.server.server_address[1]

    def _on_store(self, event):
        time.sleep(self.delay)
        if self.abort_after is not None and len(self.received) >= self.abort_after:
            event.assoc.abort()
            return 0xA700
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append((str(ds.SOPInstanceUID), str(event.context.transfer_syntax), ds))
        return self.status

    def dest(self, **kw) -> DestinationSettings:
        return DestinationSettings(name="pacs", type="dicom", ae_title=kw.pop("ae_title", "PACS"),
                                   host="127.0.0.1", port=self.port, timeout=5, **kw)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


@pytest.fixture()
def scps():
    started: list[SCP] = []

    def start(contexts, **kw) -> SCP:
        scp = SCP(contexts, **kw)
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


def _files(tmp_path: Path, n: int, *, syntax: str = ExplicitVRLittleEndian, sop_class: str = CR_STORAGE,
           modality: str = "CR") -> list[Path]:
    out = []
    for i in range(n):
        ds = make_dataset(rows=48, cols=40, seed=i, sop_class=sop_class, modality=modality)
        if syntax != ExplicitVRLittleEndian:
            if syntax == ImplicitVRLittleEndian:
                ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            else:
                ds.compress(syntax)
        out.append(Path(write(ds, tmp_path / f"{modality}{i}.dcm")))
    return out


def test_delivers_every_file_in_order(scps, tmp_path):
    scp = scps({CR_STORAGE: UNCOMPRESSED})
    files = _files(tmp_path, 3)
    results = deliver(scp.dest(), files, calling_ae="NODE")
    assert [r.path for r in results] == files
    assert all(r.ok and r.status == 0 and r.error is None for r in results)
    sent = [pydicom.dcmread(f) for f in files]
    assert [uid for uid, _, _ in scp.received] == [ds.SOPInstanceUID for ds in sent]
    for (_, _, got), ds in zip(scp.received, sent, strict=True):
        assert np.array_equal(got.pixel_array, ds.pixel_array)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_file_is_decompressed_for_peer_taking_only_uncompressed(scps, tmp_path, syntax):
    scp = scps({CR_STORAGE: [ExplicitVRLittleEndian]})
    [path] = _files(tmp_path, 1, syntax=syntax)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    [result] = deliver(scp.dest(), [path], calling_ae="NODE")
    assert result.ok, result.error
    [(uid, ts, got)] = scp.received
    original = pydicom.dcmread(path)
    assert ts == ExplicitVRLittleEndian
    assert uid == original.SOPInstanceUID  # the same instance, only re-encoded
    assert np.array_equal(got.pixel_array, original.pixel_array)


def test_compressed_file_is_sent_as_is_when_peer_accepts_its_syntax(scps, tmp_path):
    scp = scps({CR_STORAGE: [RLELossless, ExplicitVRLittleEndian]})
    [path] = _files(tmp_path, 1, syntax=RLELossless)
    [result] = deliver(scp.dest(), [path], calling_ae="NODE")
    assert result.ok, result.error
    [(_, ts, got)] = scp.received
    assert ts == RLELossless
    assert got.PixelData == pydicom.dcmread(path).PixelData  # the original compressed bytes


@pytest.mark.parametrize("syntax", [DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian])
def test_deflated_and_big_endian_files_reach_a_plain_peer(scps, tmp_path, syntax):
    scp = scps({CR_STORAGE: [ExplicitVRLittleEndian]})
    ds = make_dataset(rows=24, cols=20)
    pixels = ds.pixel_array.copy()
    ds.file_meta.TransferSyntaxUID = syntax
    if syntax == ExplicitVRBigEndian:
        ds.PixelData = pixels.astype(">u2").tobytes()
    path = Path(write(ds, tmp_path / "x.dcm"))
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    [result] = deliver(scp.dest(), [path], calling_ae="NODE")
    assert result.ok, result.error
    [(uid, ts, got)] = scp.received
    assert ts == ExplicitVRLittleEndian and uid == ds.SOPInstanceUID
    assert np.array_equal(got.pixel_array, pixels)


def test_file_that_cannot_be_decoded_fails_alone(scps, tmp_path):
    """A syntax we cannot decode (MPEG2 here) for a peer that wants uncompressed data."""
    from pydicom.encaps import encapsulate

    scp = scps({CR_STORAGE: [ExplicitVRLittleEndian]})
    ds = make_dataset(rows=16, cols=16)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    ds.PixelData = encapsulate([b"\x00\x01" * 64])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    bad = Path(write(ds, tmp_path / "mpeg.dcm"))
    good = _files(tmp_path, 1)
    results = deliver(scp.dest(), [bad, *good], calling_ae="NODE")
    assert not results[0].ok and results[0].error.startswith("cannot send")
    assert results[1].ok
    assert [uid for uid, _, _ in scp.received] == [pydicom.dcmread(good[0]).SOPInstanceUID]


def test_explicit_file_goes_implicit_to_implicit_only_peer(scps, tmp_path):
    scp = scps({CR_STORAGE: [ImplicitVRLittleEndian]})
    [path] = _files(tmp_path, 1)
    [result] = deliver(scp.dest(), [path], calling_ae="NODE")
    assert result.ok, result.error
    assert scp.received[0][1] == ImplicitVRLittleEndian


def test_more_sop_classes_than_one_association_can_negotiate(scps, tmp_path):
    """65 SOP classes, each compressed: 130 presentation contexts > 128, so two associations."""
    from pynetdicom import StoragePresentationContexts
    from pynetdicom.service_class import StorageServiceClass
    from pynetdicom.sop_class import uid_to_service_class

    sop_classes = [cx.abstract_syntax for cx in StoragePresentationContexts
                   if uid_to_service_class(cx.abstract_syntax) is StorageServiceClass][:65]
    assert len(sop_classes) == 65
    scp = scps({sop: [RLELossless, ExplicitVRLittleEndian] for sop in sop_classes})
    associations = []
    scp.server.bind(evt.EVT_ACCEPTED, lambda event: associations.append(event.assoc))
    files = []
    for i, sop in enumerate(sop_classes):
        ds = make_dataset(rows=8, cols=8, sop_class=sop, seed=i)
        ds.compress(RLELossless)
        files.append(Path(write(ds, tmp_path / f"{i}.dcm")))
    results = deliver(scp.dest(), files, calling_ae="NODE")
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    assert [r.path for r in results] == files
    assert len(scp.received) == 65 and {ts for _, ts, _ in scp.received} == {RLELossless}
    assert len(associations) == 2


def test_refused_sop_class_fails_only_that_file(scps, tmp_path):
    scp = scps({CTImageStorage: UNCOMPRESSED})
    cr = _files(tmp_path, 1)
    ct = _files(tmp_path, 1, sop_class=CTImageStorage, modality="CT")
    results = deliver(scp.dest(), cr + ct, calling_ae="NODE")
    assert not results[0].ok and "refused SOP class" in results[0].error
    assert results[1].ok, results[1].error
    assert len(scp.received) == 1


def test_warning_status_counts_as_delivered_and_failure_does_not(scps, tmp_path):
    files = _files(tmp_path, 1)
    warn = scps({CR_STORAGE: UNCOMPRESSED}, status=0xB000)
    [r] = deliver(warn.dest(), files, calling_ae="NODE")
    assert r.ok and r.status == 0xB000
    full = scps({CR_STORAGE: UNCOMPRESSED}, status=0xA700)
    [r] = deliver(full.dest(), files, calling_ae="NODE")
    assert not r.ok and r.status == 0xA700 and "0xA700" in r.error


def test_peer_down_gives_failed_results_not_exceptions(scps, tmp_path):
    scp = scps({CR_STORAGE: UNCOMPRESSED})
    dest = scp.dest()
    scp.stop()  # nothing listens on that port any more
    files = _files(tmp_path, 2)
    start = time.monotonic()
    results = deliver(dest, files, calling_ae="NODE")
    assert time.monotonic() - start < 10
    assert [r.ok for r in results] == [False, False]
    assert all("cannot connect" in r.error for r in results)


def test_rejected_association_is_reported(scps, tmp_path):
    scp = scps({CR_STORAGE: UNCOMPRESSED})
    results = deliver(scp.dest(ae_title="NOT_PACS"), _files(tmp_path, 1), calling_ae="NODE")
    assert not results[0].ok and "rejected" in results[0].error
    assert scp.received == []


def test_abort_midway_fails_the_rest(scps, tmp_path):
    scp = scps({CR_STORAGE: UNCOMPRESSED}, abort_after=1, timeout=0.5)
    results = deliver(scp.dest(), _files(tmp_path, 3), calling_ae="NODE")
    assert results[0].ok
    assert [r.ok for r in results[1:]] == [False, False]
    assert all(r.error for r in results[1:])


def test_peer_that_never_answers_costs_one_timeout(scps, tmp_path):
    scp = scps({CR_STORAGE: UNCOMPRESSED}, delay=2.0)
    dest = scp.dest()
    dest.timeout = 0.5
    start = time.monotonic()
    results = deliver(dest, _files(tmp_path, 3), calling_ae="NODE")
    assert time.monotonic() - start < 1.8  # not one timeout per file
    assert [r.ok for r in results] == [False, False, False]
    assert "no C-STORE response" in results[0].error
    assert all("ended early" in r.error for r in results[1:])


def test_unreadable_file_does_not_stop_the_others(scps, tmp_path):
    scp = scps({CR_STORAGE: UNCOMPRESSED})
    bad = tmp_path / "junk.dcm"
    bad.write_bytes(b"not dicom at all")
    good = _files(tmp_path, 1)
    results = deliver(scp.dest(), [bad, *good, tmp_path / "missing.dcm"], calling_ae="NODE")
    assert [r.ok for r in results] == [False, True, False]
    assert len(scp.received) == 1


def test_calling_ae_is_ours(scps, tmp_path):
    seen = []
    scp = scps({CR_STORAGE: UNCOMPRESSED})
    scp.server.bind(evt.EVT_C_STORE, lambda e: seen.append(e.assoc.requestor.ae_title) or 0)
    deliver(scp.dest(), _files(tmp_path, 1), calling_ae="NODE_X")
    deliver(scp.dest(calling_ae="PER_DEST"), _files(tmp_path, 1), calling_ae="NODE_X")
    assert seen == ["NODE_X", "PER_DEST"]


# ------------------------------------------------------------------------------ folder


def _folder(path: Path) -> DestinationSettings:
    return DestinationSettings(name="outbox", type="folder", path=path)


def test_folder_layout_and_content(tmp_path):
    (tmp_path / "src").mkdir()
    files = _files(tmp_path / "src", 2)
    out = tmp_path / "out"
    results = deliver(_folder(out), files, calling_ae="NODE")
    assert all(r.ok for r in results)
    for f in files:
        ds = pydicom.dcmread(f)
        target = out / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert target.read_bytes() == f.read_bytes()
    leftovers = [p for p in out.rglob("*") if p.is_file() and not p.name.endswith(".dcm")]
    assert leftovers == []


def test_folder_is_idempotent_and_replaces_changed_content(tmp_path):
    (tmp_path / "src").mkdir()
    [f] = _files(tmp_path / "src", 1)
    out = tmp_path / "out"
    assert deliver(_folder(out), [f], calling_ae="NODE")[0].ok
    [target] = list(out.rglob("*.dcm"))
    inode = target.stat().st_ino
    assert deliver(_folder(out), [f], calling_ae="NODE")[0].ok
    assert target.stat().st_ino == inode  # identical resend: left alone

    ds = pydicom.dcmread(f)
    ds.SeriesDescription = "changed"
    ds.save_as(f)
    assert deliver(_folder(out), [f], calling_ae="NODE")[0].ok
    assert target.read_bytes() == f.read_bytes()
    assert list(out.rglob("*.dcm")) == [target]
    assert [p for p in target.parent.iterdir() if p != target] == []  # no temp files left


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
@pytest.mark.parametrize("field,value", [
    ("StudyInstanceUID", "../../../etc"),
    ("SeriesInstanceUID", "1.2/../../x"),
    ("SOPInstanceUID", "1." + "2" * 63),  # 65 characters
    ("SOPInstanceUID", "/tmp/evil"),
    ("StudyInstanceUID", ""),
])
def test_folder_refuses_malicious_uids(tmp_path, field, value):
    ds = make_dataset(rows=16, cols=16)
    setattr(ds, field, value)
    src = tmp_path / "src.dcm"
    write(ds, src)
    out = tmp_path / "out"
    [r] = deliver(_folder(out), [src], calling_ae="NODE")
    assert not r.ok and "refused" in r.error
    assert not out.exists() or list(out.rglob("*")) == []
    assert [p.name for p in tmp_path.rglob("*")] == ["src.dcm"]  # nothing written anywhere else
    assert not Path("/tmp/evil.dcm").exists()


def test_folder_write_failure_is_a_result(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should be")
    (tmp_path / "src").mkdir()
    [f] = _files(tmp_path / "src", 1)
    [r] = deliver(_folder(blocker), [f], calling_ae="NODE")
    assert not r.ok and r.error


def test_valid_uid():
    assert valid_uid(generate_uid())
    assert valid_uid("1.2.840.10008.1.2")
    for bad in ["", "1..2", ".1", "1.", "1.2a", "1.2 ", "..", "1/2", None, 12, "1" * 65]:
        assert not valid_uid(bad), bad


def test_files_are_not_left_open_or_partial(tmp_path):
    (tmp_path / "src").mkdir()
    files = _files(tmp_path / "src", 3)
    out = tmp_path / "out"
    before = len(os.listdir(f"/proc/{os.getpid()}/fd")) if Path("/proc/self/fd").exists() else 0
    deliver(_folder(out), files, calling_ae="NODE")
    after = len(os.listdir(f"/proc/{os.getpid()}/fd")) if Path("/proc/self/fd").exists() else 0
    assert after <= before


def test_no_patient_data_in_logs(scps, tmp_path, caplog):
    """Even at DEBUG (pynetdicom dumps PDUs there) no patient name or ID reaches the log."""
    from tests.factory import PATIENT_ID, PATIENT_NAME

    caplog.set_level(logging.DEBUG)
    scp = scps({CR_STORAGE: [ExplicitVRLittleEndian]})
    files = _files(tmp_path, 1, syntax=RLELossless)
    assert deliver(scp.dest(), files, calling_ae="NODE")[0].ok
    stopped = scps({CR_STORAGE: UNCOMPRESSED})
    dest = stopped.dest()
    stopped.stop()
    deliver(dest, files, calling_ae="NODE")
    deliver(_folder(tmp_path / "out"), files, calling_ae="NODE")
    text = caplog.text
    assert "delivered 1/1" in text  # the log was captured
    for secret in (PATIENT_NAME, PATIENT_ID, PATIENT_NAME.split("^")[0]):
        assert secret not in text


# ----------------------------------------------------------------- real peers (interop)


@pytest.fixture(scope="module")
def mixed_study(tmp_path_factory):
    from tests.mixed_study import build_mixed_study

    require_tool("dcmcjpeg")
    return build_mixed_study(tmp_path_factory.mktemp("mixed"))


@pytest.mark.interop
def test_mixed_study_to_orthanc_keeps_original_encodings(mixed_study, tmp_path):
    from tests.peers import Orthanc

    orthanc = Orthanc(tmp_path / "orthanc").start()
    try:
        dest = DestinationSettings(name="orthanc", type="dicom", ae_title=orthanc.ae_title, host="127.0.0.1",
                                   port=orthanc.dicom_port, timeout=20)
        files = [i.path for i in mixed_study.instances]
        results = deliver(dest, files, calling_ae="NODE")
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]
        assert sorted(orthanc.sop_instance_uids()) == sorted(i.sop_instance_uid for i in mixed_study.instances)
        by_uid = {i.sop_instance_uid: i for i in mixed_study.instances}
        for oid in orthanc.get("/instances"):
            uid = orthanc.instance_tags(oid)["SOPInstanceUID"]
            stored_ts = orthanc.get_bytes(f"/instances/{oid}/metadata/TransferSyntax").decode()
            if by_uid[uid].transfer_syntax in UNCOMPRESSED:
                assert stored_ts in UNCOMPRESSED  # explicit <-> implicit is the peer's choice
            else:
                assert stored_ts == by_uid[uid].transfer_syntax, by_uid[uid].label  # compressed bytes sent as is
        # a resend is harmless (same SOP Instance UIDs; Orthanc keeps one copy)
        assert all(r.ok for r in deliver(dest, files, calling_ae="NODE"))
        assert orthanc.instance_count() == len(files)
    finally:
        orthanc.stop()


@pytest.mark.interop
def test_mixed_study_to_uncompressed_only_storescp_is_decoded(mixed_study, tmp_path):
    """dcmtk storescp without +xa accepts only uncompressed syntaxes: every compressed
    file must be decoded by us and arrive pixel-identical."""
    from tests.peers import free_port, wait_for_port

    exe = require_tool("storescp")
    out = tmp_path / "storescp"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen([exe, "-aet", "STORESCP", "-od", str(out), "-uf", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc=proc)
        dest = DestinationSettings(name="scp", type="dicom", ae_title="STORESCP", host="127.0.0.1", port=port,
                                   timeout=20)
        results = deliver(dest, [i.path for i in mixed_study.instances], calling_ae="NODE")
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    received = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in out.iterdir()}
    assert set(received) == {i.sop_instance_uid for i in mixed_study.instances}
    compressed = [i for i in mixed_study.instances
                  if i.transfer_syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)]
    assert len(compressed) >= 4
    for inst in mixed_study.instances:
        got = received[inst.sop_instance_uid]
        assert got.file_meta.TransferSyntaxUID in UNCOMPRESSED, inst.label
        if "PixelData" in got:
            assert np.array_equal(got.pixel_array, pydicom.dcmread(inst.path).pixel_array), inst.label


@given(st.text(max_size=80) | st.from_regex(r"[0-9.]{1,70}", fullmatch=True))
@settings(max_examples=300, deadline=None)
def test_valid_uid_is_always_a_plain_file_name(text):
    if valid_uid(text):
        assert "/" not in text and "\\x00" not in text and text not in (".", "..")
        assert len(text) <= 64 and Path(text).name == text and not Path(text).is_absolute()

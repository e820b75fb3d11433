"""The interop harness itself: the mixed study and the real peers, without the node.

Why: when a node interop test fails, we must know the peers and the test data are sound.
These tests pin that dcmtk ``storescu`` delivers every encoding of the mixed study to
Orthanc and to dcmtk ``storescp`` unchanged, that the sources pass dciodvfy, and that the
Orthanc fixture survives a stop/start with its archive (the fault tests rely on that).
"""
from __future__ import annotations

import pydicom
import pytest

from tests.mixed_study import build_mixed_study
from tests.peers import (
    Orthanc,
    StoreSCP,
    acknowledged_sop_uids,
    dciodvfy_errors,
    echoscu,
    storescu,
)

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return build_mixed_study(tmp_path_factory.mktemp("mixed"))


def test_mixed_study_covers_the_encodings(study):
    names = {i.label for i in study.instances}
    syntaxes = {str(s) for s in study.transfer_syntaxes}
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
            "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5"} <= syntaxes
    assert {i.photometric for i in study.instances} >= {"MONOCHROME1", "MONOCHROME2"}
    assert {i.bits_stored for i in study.instances} >= {8, 12, 16}
    assert {"ct12-explicit", "sr"} <= names
    for inst in study.instances:
        assert dciodvfy_errors(inst.path) == [], inst.label


def test_storescu_delivers_every_encoding_to_orthanc_and_storescp(study, tmp_path):
    files = [i.path for i in study.instances]
    orthanc = Orthanc(tmp_path / "orthanc").start()
    scp = StoreSCP(tmp_path / "storescp").start()
    try:
        assert echoscu(orthanc.dicom_port, "ORTHANC").returncode == 0
        res = storescu(files, orthanc.dicom_port, "ORTHANC", profile_dir=tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
        assert acknowledged_sop_uids(res.stdout + res.stderr, files) == {i.sop_instance_uid for i in study.instances}
        # Orthanc stored each instance in the syntax it was sent in (no silent transcoding).
        sid = orthanc.find_study(study.study_instance_uid)
        assert sid is not None
        stored = {}
        for oid in orthanc.get(f"/studies/{sid}/instances"):
            uid = oid["MainDicomTags"]["SOPInstanceUID"]
            stored[uid] = orthanc.get_bytes(f"/instances/{oid['ID']}/metadata/TransferSyntax").decode()
        assert stored == {i.sop_instance_uid: str(i.transfer_syntax) for i in study.instances}

        res = storescu(files, scp.port, "STORESCP", profile_dir=tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
        got = {pydicom.dcmread(str(p), stop_before_pixels=True).SOPInstanceUID for p in scp.files()}
        assert got == {i.sop_instance_uid for i in study.instances}

        # The archive survives a restart on the same ports (the "PACS down" fault relies on it).
        orthanc.stop()
        assert echoscu(orthanc.dicom_port, "ORTHANC").returncode != 0
        orthanc.start()
        assert orthanc.instance_count() == len(study.instances)
    finally:
        scp.stop()
        orthanc.stop()

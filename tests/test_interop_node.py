"""The node between real, independent DICOM peers: dcmtk as the modality, Orthanc as the
PACS, dcmtk storescp as a second archive, dciodvfy as the judge of what we produce.

Why: pynetdicom-only tests prove the node agrees with pynetdicom.  A hospital connects
modalities and archives we did not write, which negotiate, encode and check differently.
"""
from __future__ import annotations

import pydicom
import pytest

from tests.certs import make_pki
from tests.factory import make_dataset, write
from tests.mixed_study import build_mixed_study
from tests.peers import (
    NodeProcess,
    Orthanc,
    StoreSCP,
    acknowledged_sop_uids,
    dciodvfy_errors,
    echoscu,
    storescu,
    tiny_node_config,
    wait_until,
)

pytestmark = pytest.mark.interop

SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
CALLED = "DR_KIM_STYLE"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return build_mixed_study(tmp_path_factory.mktemp("mixed"))


@pytest.fixture(scope="module")
def peers(tmp_path_factory, tiny_model_path):
    """Orthanc (PACS) + dcmtk storescp (archive) + the node forwarding to both."""
    root = tmp_path_factory.mktemp("interop-node")
    orthanc = Orthanc(root / "orthanc")
    archive = StoreSCP(root / "archive")
    node = None
    try:
        archive.start()
        destinations = {
            "pacs": {"type": "dicom", "ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port},
            "archive": {"type": "dicom", "ae_title": archive.ae_title, "host": "127.0.0.1", "port": archive.port},
        }
        node = NodeProcess(root / "node", tiny_node_config(tiny_model_path, destinations))
        orthanc.modalities = {"dicomnode": ("DICOMNODE", "127.0.0.1", node.port)}
        orthanc.start()
        node.start()
        yield root, orthanc, archive, node
    finally:
        if node is not None:
            node.stop()
        archive.stop()
        orthanc.stop()


def test_dcmtk_echo_and_unknown_called_ae(peers):
    _, _, _, node = peers
    assert echoscu(node.port, CALLED).returncode == 0
    res = echoscu(node.port, "NOBODY_STYLE")
    assert res.returncode != 0
    assert "Called AE Title Not Recognized" in (res.stdout + res.stderr)
    assert echoscu(node.port, CALLED).returncode == 0  # still serving


def test_mixed_study_from_dcmtk_reaches_orthanc_and_storescp_as_valid_sc(peers, study, tmp_path):
    root, orthanc, archive, node = peers
    files = [i.path for i in study.instances]
    res = storescu(files, node.port, CALLED, calling_ae="CR_ROOM1", profile_dir=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert acknowledged_sop_uids(res.stdout + res.stderr, files) == {i.sop_instance_uid for i in study.instances}

    expected = {i.sop_instance_uid: i for i in study.translated}

    def n_orthanc() -> int:
        return sum(len(s["Instances"]) for s in orthanc.study_series(study.study_instance_uid))

    wait_until(lambda: n_orthanc() >= len(expected), timeout=90,
               message=f"{len(expected)} SC instances in Orthanc\n{node.log_tail()}")
    wait_until(lambda: len(archive.files()) >= len(expected), timeout=30, message="SC instances in storescp")

    # Orthanc: only the new SC series (originals are not forwarded), one per source series.
    series = orthanc.study_series(study.study_instance_uid)
    assert len(series) == len(study.translated_series)
    source = pydicom.dcmread(str(study.instances[0].path), stop_before_pixels=True)
    referenced: dict[str, str] = {}
    for s in series:
        assert s["MainDicomTags"]["SeriesInstanceUID"] not in {i.series_instance_uid for i in study.instances}
        source_series = set()
        for oid in s["Instances"]:
            tags = orthanc.instance_tags(oid)
            assert tags["SOPClassUID"] == SC_STORAGE
            for kw in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                       "AccessionNumber", "StudyDate", "StudyTime", "StudyID"):
                assert tags.get(kw) == str(source.get(kw)), kw
            assert "DERIVED" in tags["ImageType"] and "SECONDARY" in tags["ImageType"]
            refs = tags["SourceImageSequence"]
            assert len(refs) == 1
            ref_uid = refs[0]["ReferencedSOPInstanceUID"]
            assert ref_uid in expected, "SC references an instance that should not be translated"
            assert refs[0]["ReferencedSOPClassUID"] == str(
                pydicom.dcmread(str(expected[ref_uid].path), stop_before_pixels=True).SOPClassUID)
            assert ref_uid not in referenced, "two SC instances for one source"
            referenced[ref_uid] = tags["SOPInstanceUID"]
            source_series.add(expected[ref_uid].series_instance_uid)
        assert len(source_series) == 1, "an SC series mixes source series"
    assert set(referenced) == set(expected)

    # storescp got the same SC objects, and every one of them passes dciodvfy.
    archived = {pydicom.dcmread(str(p), stop_before_pixels=True).SOPInstanceUID: p for p in archive.files()}
    assert set(archived) == set(referenced.values())
    for uid, path in archived.items():
        assert dciodvfy_errors(path) == [], f"dciodvfy errors in SC {uid}"
        ds = pydicom.dcmread(str(path))
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)

    # The CT and the SR were acknowledged but not translated, and the node still answers.
    assert echoscu(node.port, CALLED).returncode == 0
    assert "PID-SECRET" not in node.log_text() and "SECRET^PATIENT" not in node.log_text()


def test_dcmtk_storescu_over_tls(tmp_path, tiny_model_path):
    """storescu +tls with a client certificate from our CA; a plain connection is refused."""
    pki = make_pki(tmp_path / "pki")
    outbox = tmp_path / "outbox"
    config = tiny_node_config(tiny_model_path, {"outbox": {"type": "folder", "path": str(outbox)}}, stable=0.5)
    config["node"]["tls"] = {"cert": str(pki.server_cert), "key": str(pki.server_key), "ca": str(pki.ca),
                             "require_client_cert": True}
    node = NodeProcess(tmp_path / "node", config).start()
    try:
        src = write(make_dataset(rows=64, cols=48), tmp_path / "cr.dcm")
        tls = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
        res = storescu([src], node.port, CALLED, extra=tls)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        assert "Received Store Response (Success" in res.stdout + res.stderr
        wait_until(lambda: outbox.exists() and any(outbox.rglob("*.dcm")), timeout=60,
                   message=f"SC in the folder destination\n{node.log_tail()}")
        sc = pydicom.dcmread(str(next(outbox.rglob("*.dcm"))))
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == pydicom.dcmread(src).SOPInstanceUID

        # Without TLS, or with a certificate from another CA, no association.
        assert storescu([src], node.port, CALLED).returncode != 0
        rogue = ["+tls", str(pki.rogue_client_key), str(pki.rogue_client_cert), "+cf", str(pki.ca)]
        assert storescu([src], node.port, CALLED, extra=rogue).returncode != 0
        assert echoscu(node.port, CALLED, extra=tls).returncode == 0
    finally:
        node.stop()

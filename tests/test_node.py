"""The node end to end, in process, over real associations on 127.0.0.1.

Each test runs a real :class:`dicom_node.node.Node` (listener + workers + SQLite spool) on a
kernel-chosen port, sends with pynetdicom, and checks what arrives at a pynetdicom storage
SCP (standing in for a PACS) and in a folder destination.
"""
from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node.config import parse_config
from dicom_node.node import Node
from tests.factory import CR_STORAGE, PATIENT_ID, PATIENT_NAME, make_dataset
from tests.nodeproc import Receiver, associate_result, folder_uids, node_config, send, wait_for

SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


from tests.postgres import both_backends, postgres_server  # noqa: E402,F401 - fixtures

pytestmark = pytest.mark.usefixtures("both_backends")  # every test on SQLite and on PostgreSQL

def make_node(tmp_path: Path, model: Path, *, destinations, routes, stable: float = 0.3, **extra) -> Node:
    """A Node from a config dict run through the real config parser, on a kernel-chosen port."""
    raw = node_config(tmp_path, port=11112, model_path=model, destinations=destinations, routes=routes,
                      stable=stable, **extra)
    config = parse_config(raw, base_dir=tmp_path)
    config.node.port = 0  # the kernel picks a free port; Node.start returns it
    return Node(config)


def study(n: int, *, modality: str = "CR", sop_class: str = CR_STORAGE, size: int = 64):
    study_uid, series_uid = generate_uid(), generate_uid()
    return [make_dataset(rows=size, cols=size, study_uid=study_uid, series_uid=series_uid, modality=modality,
                         sop_class=sop_class, seed=i) for i in range(n)]


def instance_states(node: Node) -> dict[str, str]:
    return {r.sop_uid: r.state for r in node.db.instances()}


def test_whole_path_dicom_and_folder_destinations(tmp_path, tiny_model_path):
    """A study sent to a radiologist AE arrives as an SC series at the PACS and in the folder."""
    with Receiver("PACS") as pacs:
        node = make_node(tmp_path, tiny_model_path,
                         destinations={"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                                                "port": pacs.port},
                                       "outbox": {"type": "folder", "path": str(tmp_path / "outbox")}},
                         routes=[{"called_ae": "DR_KIM_STYLE", "model": "tiny", "destinations": ["pacs", "outbox"]}],
                         workers=2,  # two translators must never take the same instance
                         storage={"keep_sources_days": 0})  # removed once delivered (no reprocess)
        with node:
            sources = study(3)
            assert send(node.port, sources, called="DR_KIM_STYLE") == [0, 0, 0]
            assert wait_for(lambda: len(pacs.received) >= 3 and len(folder_uids(tmp_path / "outbox")) >= 3, 30)
            assert wait_for(lambda: set(instance_states(node).values()) == {"delivered"}, 10)
        src_uids = {str(ds.SOPInstanceUID) for ds in sources}
        received = list(pacs.received)
        assert len(received) == 3  # each exactly once
        assert sorted(str(ds.SOPInstanceUID) for ds in received) == sorted(folder_uids(tmp_path / "outbox"))
        refs = set()
        for sc in received:
            assert str(sc.SOPClassUID) == SC_STORAGE
            assert str(sc.StudyInstanceUID) == str(sources[0].StudyInstanceUID)
            assert str(sc.SeriesInstanceUID) != str(sources[0].SeriesInstanceUID)
            assert str(sc.SOPInstanceUID) not in src_uids
            assert str(sc.PatientID) == PATIENT_ID
            refs.add(str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID))
        assert refs == src_uids
        # one new series for one source series and one model
        assert len({str(sc.SeriesInstanceUID) for sc in received}) == 1
        # delivered, keep_sources_days 0: the spool keeps no patient data, only the rows
        # (duplicates stay recognised)
        assert list((tmp_path / "spool" / "in").rglob("*.dcm")) == []
        assert list((tmp_path / "spool" / "out").rglob("*.dcm")) == []


def test_study_waits_for_quiet_period(tmp_path, tiny_model_path):
    """Instances of a study are not processed until no new one arrived for study_stable_seconds."""
    node = make_node(tmp_path, tiny_model_path, stable=2.5,
                     destinations={"outbox": {"type": "folder", "path": str(tmp_path / "outbox")}},
                     routes=[{"called_ae": "DR_KIM_STYLE", "model": "tiny", "destinations": ["outbox"]}])
    with node:
        first, second = study(2)
        send(node.port, [first], called="DR_KIM_STYLE")
        time.sleep(1.3)
        send(node.port, [second], called="DR_KIM_STYLE")  # a second association restarts the timer
        time.sleep(1.3)
        # Now 2.6 s after the first instance (alone, its study would have been released at 2.5 s)
        # but only 1.3 s after the second: nothing may be processed.  Delays on a loaded machine
        # only lengthen the first interval; the second has 1.2 s of margin.
        assert set(instance_states(node).values()) == {"received"}
        assert folder_uids(tmp_path / "outbox") == []
        assert wait_for(lambda: len(folder_uids(tmp_path / "outbox")) == 2, 20)


def test_unknown_called_ae_and_calling_ae_allow_list(tmp_path, tiny_model_path):
    node = make_node(tmp_path, tiny_model_path,
                     destinations={"outbox": {"type": "folder", "path": str(tmp_path / "outbox")}},
                     routes=[{"called_ae": "DR_KIM_STYLE", "model": "tiny", "destinations": ["outbox"],
                              "calling_ae": ["CR_ROOM1"]}])
    with node:
        unknown = associate_result(node.port, called="NOBODY", calling="CR_ROOM1")
        assert unknown.is_rejected
        assert unknown.acceptor.primitive.diagnostic == 7  # called AE title not recognised
        stranger = associate_result(node.port, called="DR_KIM_STYLE", calling="EVIL")
        assert stranger.is_rejected
        assert stranger.acceptor.primitive.diagnostic == 3  # calling AE title not recognised
        allowed = associate_result(node.port, called="DR_KIM_STYLE", calling="CR_ROOM1")
        assert allowed.is_released
        # C-ECHO on an accepted association
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title="CR_ROOM1")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DR_KIM_STYLE")
        assert int(assoc.send_c_echo().Status) == 0
        assoc.release()


def test_non_matching_modality_kept_and_forwarded_untouched(tmp_path, tiny_model_path):
    """A CT sent to a CR/DX route is not translated; forward_original sends it untouched."""
    outbox = tmp_path / "outbox"
    node = make_node(tmp_path, tiny_model_path,
                     destinations={"outbox": {"type": "folder", "path": str(outbox)},
                                   "other": {"type": "folder", "path": str(tmp_path / "other")}},
                     routes=[{"called_ae": "KIM", "model": "tiny", "destinations": ["outbox"],
                              "match": {"Modality": ["CR", "DX"]}, "forward_original": True},
                             {"called_ae": "LEE", "model": "tiny", "destinations": ["other"],
                              "match": {"Modality": ["CR"]}}])
    with node:
        cr = study(1)[0]
        ct = make_dataset(rows=32, cols=32, modality="CT", sop_class=CT_STORAGE)
        assert send(node.port, [cr, ct], called="KIM") == [0, 0]
        ct_lee = make_dataset(rows=32, cols=32, modality="CT", sop_class=CT_STORAGE)
        assert send(node.port, [ct_lee], called="LEE") == [0]
        # KIM: CR translated (+ its original), CT forwarded untouched
        assert wait_for(lambda: len(folder_uids(outbox)) == 3, 20)
        assert wait_for(lambda: instance_states(node)[str(cr.SOPInstanceUID)] == "delivered", 10)
        states = instance_states(node)
        assert states[str(ct.SOPInstanceUID)] == "unmatched"
        assert states[str(ct_lee.SOPInstanceUID)] == "unmatched"
        assert states[str(cr.SOPInstanceUID)] == "delivered"
        time.sleep(0.5)
    files = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in outbox.rglob("*.dcm")}
    forwarded = pydicom.dcmread(files[str(ct.SOPInstanceUID)])
    assert str(forwarded.SOPClassUID) == CT_STORAGE and forwarded.PixelData == ct.PixelData
    sc = [pydicom.dcmread(p) for p in files.values() if pydicom.dcmread(p).SOPClassUID == SC_STORAGE]
    assert len(sc) == 1 and str(sc[0].SourceImageSequence[0].ReferencedSOPInstanceUID) == str(cr.SOPInstanceUID)
    # LEE has no forward_original: the CT stays in the spool only
    assert folder_uids(tmp_path / "other") == []
    kept = tmp_path / "spool" / "in" / "LEE" / f"{ct_lee.SOPInstanceUID}.dcm"
    assert pydicom.dcmread(kept).PixelData == ct_lee.PixelData
    assert kept.stat().st_mode & 0o777 == 0o600  # patient data: owner only
    assert (tmp_path / "spool").stat().st_mode & 0o777 == 0o700


def test_non_image_object_is_kept_and_forwarded(tmp_path, tiny_model_path):
    """An SR (no pixels) is received; the engine refuses it; forward_original sends it on."""
    from pydicom.dataset import Dataset, FileMetaDataset

    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    sr.SOPInstanceUID = generate_uid()
    sr.StudyInstanceUID, sr.SeriesInstanceUID = generate_uid(), generate_uid()
    sr.PatientName, sr.PatientID, sr.Modality = PATIENT_NAME, PATIENT_ID, "SR"
    node = make_node(tmp_path, tiny_model_path,
                     destinations={"outbox": {"type": "folder", "path": str(tmp_path / "outbox")}},
                     routes=[{"called_ae": "KIM", "model": "tiny", "destinations": ["outbox"],
                              "forward_original": True}])
    with node:
        assert send(node.port, [sr], called="KIM") == [0]
        assert wait_for(lambda: folder_uids(tmp_path / "outbox") == [str(sr.SOPInstanceUID)], 20)
        assert instance_states(node)[str(sr.SOPInstanceUID)] == "unsupported"


def test_duplicates_are_idempotent(tmp_path, tiny_model_path):
    with Receiver("PACS") as pacs:
        node = make_node(tmp_path, tiny_model_path,
                         destinations={"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                                                "port": pacs.port}},
                         routes=[{"called_ae": "KIM", "model": "tiny", "destinations": ["pacs"]}])
        with node:
            ds = study(1)[0]
            assert send(node.port, [ds, ds], called="KIM") == [0, 0]
            assert wait_for(lambda: len(pacs.received) == 1, 20)
            assert send(node.port, [ds], called="KIM") == [0]  # after processing: still success, no rework
            time.sleep(1.0)
            assert len(pacs.received) == 1
            assert len(list(node.db.instances())) == 1


def test_full_disk_and_oversize_refused_with_out_of_resources(tmp_path, tiny_model_path):
    node = make_node(tmp_path, tiny_model_path,
                     destinations={"outbox": {"type": "folder", "path": str(tmp_path / "outbox")}},
                     routes=[{"called_ae": "KIM", "model": "tiny", "destinations": ["outbox"]}],
                     storage={"min_free_bytes": 1 << 60})
    with node:
        assert send(node.port, study(1), called="KIM") == [0xA700]
        assert list(node.db.instances()) == []
        node.config.storage.min_free_bytes = 0
        node.config.node.max_instance_bytes = 1000  # the 64x64 image is ~9 kB
        assert send(node.port, study(1), called="KIM") == [0xA700]
        node.config.node.max_instance_bytes = 10**9
        assert send(node.port, study(1), called="KIM") == [0]  # still serving
        assert len(list(node.db.instances())) == 1


def test_malformed_datasets_refused_node_keeps_serving(tmp_path, tiny_model_path):
    node = make_node(tmp_path, tiny_model_path,
                     destinations={"outbox": {"type": "folder", "path": str(tmp_path / "outbox")}},
                     routes=[{"called_ae": "KIM", "model": "tiny", "destinations": ["outbox"]}])
    with node:
        no_study = study(1)[0]
        del no_study.StudyInstanceUID
        bad_uid = study(1)[0]
        bad_uid.SeriesInstanceUID = "1.2.abc.3"
        good = study(1)[0]
        assert send(node.port, [no_study, bad_uid, good], called="KIM") == [0xC000, 0xC000, 0]
        assert [r.sop_uid for r in node.db.instances()] == [str(good.SOPInstanceUID)]


def test_unparsable_dataset_refused(tmp_path, tiny_model_path):
    """Bytes that are not a DICOM data set (sent raw, chunked) get a failure status."""
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom import AE, _config

    bogus = tmp_path / "bogus.dcm"
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    with open(bogus, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, meta)
        f.write(b"\x08\x00\x18\x00UI\xff\xff" + b"garbage" * 10)  # SOPInstanceUID with a length past the end
    node = make_node(tmp_path, tiny_model_path,
                     destinations={"outbox": {"type": "folder", "path": str(tmp_path / "outbox")}},
                     routes=[{"called_ae": "KIM", "model": "tiny", "destinations": ["outbox"]}])
    with node:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CR_STORAGE, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", node.port, ae_title="KIM")
        old = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            status = assoc.send_c_store(bogus)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = old
        assoc.release()
        assert 0xC000 <= int(status.Status) <= 0xCFFF
        assert send(node.port, study(1), called="KIM") == [0]


def test_tls_association(tmp_path, tiny_model_path):
    import ssl

    from tests.certs import make_pki

    pki = make_pki(tmp_path / "pki")
    node = make_node(tmp_path, tiny_model_path,
                     destinations={"outbox": {"type": "folder", "path": str(tmp_path / "outbox")}},
                     routes=[{"called_ae": "KIM", "model": "tiny", "destinations": ["outbox"]}],
                     node={"tls": {"cert": str(pki.server_cert), "key": str(pki.server_key), "ca": str(pki.ca),
                                   "require_client_cert": True}})
    with node:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
        ctx.check_hostname = False
        ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        assert send(node.port, study(1), called="KIM", tls_context=ctx) == [0]
        # plain TCP to the TLS port gets no association
        with pytest.raises(ConnectionError):
            send(node.port, study(1), called="KIM")
        assert wait_for(lambda: len(folder_uids(tmp_path / "outbox")) == 1, 20)


def test_max_associations_limit(tmp_path, tiny_model_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    node = make_node(tmp_path, tiny_model_path,
                     destinations={"outbox": {"type": "folder", "path": str(tmp_path / "outbox")}},
                     routes=[{"called_ae": "KIM", "model": "tiny", "destinations": ["outbox"]}],
                     node={"max_associations": 1})
    with node:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        first = ae.associate("127.0.0.1", node.port, ae_title="KIM")
        assert first.is_established
        second = associate_result(node.port, called="KIM")
        assert second.is_rejected  # over the limit: rejected, not queued
        first.release()
        assert wait_for(lambda: associate_result(node.port, called="KIM").is_released, 5)


def test_compressed_transfer_syntaxes_accepted_and_translated(tmp_path, tiny_model_path):
    """JPEG-LS and RLE lossless sources are received as sent and translated."""
    from pydicom.uid import JPEGLSLossless, RLELossless

    from tests.factory import encode_as

    sources = study(2)
    encoded = [encode_as(sources[0], JPEGLSLossless), encode_as(sources[1], RLELossless)]
    node = make_node(tmp_path, tiny_model_path, stable=1.0,  # spool files are read before processing
                     destinations={"outbox": {"type": "folder", "path": str(tmp_path / "outbox")}},
                     routes=[{"called_ae": "KIM", "model": "tiny", "destinations": ["outbox"]}])
    with node:
        for ds in encoded:  # one association per syntax, proposing only that one (as a modality would)
            assert send(node.port, [ds], called="KIM", native_only=True) == [0]
        spooled = {r.sop_uid: pydicom.dcmread(r.path).file_meta.TransferSyntaxUID for r in node.db.instances()}
        assert spooled == {str(encoded[0].SOPInstanceUID): JPEGLSLossless, str(encoded[1].SOPInstanceUID): RLELossless}
        assert wait_for(lambda: set(instance_states(node).values()) == {"delivered"}, 30)
    assert len(folder_uids(tmp_path / "outbox")) == 2


def test_embedded_default_config_end_to_end(tmp_path, monkeypatch, caplog):
    """`dicom-node serve` without a config: DEFAULT_STYLE -> model 'default' -> ./outbox.

    Uses the bundled model when installed; otherwise the node generates an untrained one
    and says so in a warning (both paths end in an SC in ./outbox).
    """
    import logging

    from dicom_node.config import load_config
    from dicom_node.engine.model_file import bundled_model_path

    monkeypatch.chdir(tmp_path)
    config = load_config(None)
    config.node.port = 0  # the embedded 11112 may be taken by another test run
    config.study_stable_seconds = 0.2
    config.storage.min_free_bytes = 0
    caplog.set_level(logging.INFO, logger="dicom_node")
    bundled = bundled_model_path("default").exists()  # before the start: decides what the node does
    with Node(config) as node:
        ds = study(1)[0]
        assert send(node.port, [ds], called="DEFAULT_STYLE") == [0]
        assert wait_for(lambda: len(folder_uids(tmp_path / "outbox")) == 1, 60)
    assert (tmp_path / "spool" / "state.db").is_file()
    untrained_warning = any("UNTRAINED" in r.getMessage() for r in caplog.records)
    assert untrained_warning == (not bundled)


def test_second_node_on_the_same_spool_is_refused(tmp_path, tiny_model_path):
    from dicom_node.errors import UserError

    kwargs = dict(destinations={"outbox": {"type": "folder", "path": str(tmp_path / "outbox")}},
                  routes=[{"called_ae": "KIM", "model": "tiny", "destinations": ["outbox"]}])
    with make_node(tmp_path, tiny_model_path, **kwargs):
        with pytest.raises(UserError, match="in use by another dicom-node"):
            make_node(tmp_path, tiny_model_path, **kwargs).start()
    with make_node(tmp_path, tiny_model_path, **kwargs) as again:  # released at stop
        assert again.port


def test_port_in_use_is_a_one_line_user_error(tmp_path, tiny_model_path):
    import socket

    from dicom_node.errors import UserError

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        node = make_node(tmp_path, tiny_model_path,
                         destinations={"outbox": {"type": "folder", "path": str(tmp_path / "outbox")}},
                         routes=[{"called_ae": "KIM", "model": "tiny", "destinations": ["outbox"]}])
        node.config.node.port = taken.getsockname()[1]
        with pytest.raises(UserError, match="cannot listen on 127.0.0.1"):
            node.start()
        node.stop()
    finally:
        taken.close()


def test_own_output_sent_back_is_not_restyled_again(tmp_path, tiny_model_path):
    """A PACS that routes our SC back to the node must not start a restyling loop."""
    outbox = tmp_path / "outbox"
    node = make_node(tmp_path, tiny_model_path,
                     destinations={"outbox": {"type": "folder", "path": str(outbox)}},
                     routes=[{"called_ae": "KIM", "model": "tiny", "destinations": ["outbox"]}])
    with node:
        assert send(node.port, study(1), called="KIM") == [0]
        assert wait_for(lambda: len(folder_uids(outbox)) == 1, 20)
        (sc_path,) = outbox.rglob("*.dcm")
        sc = pydicom.dcmread(sc_path)
        assert send(node.port, [sc], called="KIM") == [0]
        assert wait_for(lambda: instance_states(node).get(str(sc.SOPInstanceUID)) == "unsupported", 20)
        assert folder_uids(outbox) == [str(sc.SOPInstanceUID)]  # nothing new


def test_a_corrected_resend_is_processed_again_under_the_same_output_uids(tmp_path, tiny_model_path):
    """Same SOP Instance UID, corrected demographics: the PACS receives the corrected SC with the
    same UIDs, the audit trail says it was made from revision 1; an identical resend changes nothing."""
    import copy

    with Receiver("PACS") as pacs:
        node = make_node(tmp_path, tiny_model_path,
                         destinations={"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                                                "port": pacs.port}},
                         routes=[{"called_ae": "KIM", "model": "tiny", "destinations": ["pacs"]}])
        with node:
            (first,) = study(1)
            assert send(node.port, [first], called="KIM") == [0]
            assert wait_for(lambda: len(pacs.received) == 1, 20)
            corrected = copy.deepcopy(first)
            corrected.PatientName = "CORRECTED^NAME"
            assert send(node.port, [corrected], called="KIM") == [0]
            assert wait_for(lambda: len(pacs.received) == 2, 20)
            old, new = pacs.received
            assert str(old.PatientName) == PATIENT_NAME and str(new.PatientName) == "CORRECTED^NAME"
            for kw in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
                assert new.get(kw) == old.get(kw)
            assert wait_for(lambda: set(instance_states(node).values()) == {"delivered"}, 10)
            (audit,) = node.db.audit.rows()
            assert audit["source_revision"] == 1 and audit["output_sop_uid"] == str(new.SOPInstanceUID)
            assert send(node.port, [copy.deepcopy(corrected)], called="KIM") == [0]  # the same again
            time.sleep(1.5)
            assert len(pacs.received) == 2 and len(node.db.audit.rows()) == 1

"""STOW-RS ingest (``POST /dicomweb/{called_ae}/studies``) against a running node, real parts only.

The client is plain ``http.client`` with a multipart/related body built here, so the test does
not agree with the node by sharing a library; the node runs in this process (answers, limits)
or as a ``dicom-node serve`` subprocess (translated and delivered to dcmtk ``storescp``; kill -9).
"""
from __future__ import annotations

import http.client
import io
import json
import re
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node.config import parse_config
from dicom_node.node import Node
from dicom_node.web.auth import hash_password
from tests.factory import PATIENT_ID, PATIENT_NAME, make_dataset
from tests.nodeproc import NodeProcess, Receiver, free_port, node_config, wait_for, write_config
from tests.test_node_recovery import assert_each_acknowledged_delivered_once, kill_while_sending
from tests.test_web import Browserless, _token, metric_samples

TOKEN = "stow-test-token-0123456789"
CALLED = "DR_KIM_STYLE"
BOUNDARY = "dicom-node-test-boundary"
RELATED = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


@pytest.fixture(scope="module")
def token_hash() -> str:
    return hash_password(TOKEN)


def encoded(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def multipart(parts: list[bytes], part_type: str = "application/dicom", close: bool = True) -> bytes:
    body = b"".join(b"--" + BOUNDARY.encode() + f"\r\nContent-Type: {part_type}\r\n\r\n".encode() + p + b"\r\n"
                    for p in parts)
    return body + (b"--" + BOUNDARY.encode() + b"--\r\n" if close else b"")


def post(port: int, body: bytes, *, called: str = CALLED, token: str | None = TOKEN,
         content_type: str = RELATED, tls: ssl.SSLContext | None = None,
         accept: str = "application/dicom+json") -> tuple[int, str, bytes]:
    conn = (http.client.HTTPConnection("127.0.0.1", port, timeout=60) if tls is None else
            http.client.HTTPSConnection("127.0.0.1", port, timeout=60, context=tls))
    headers = {"Content-Type": content_type, "Accept": accept}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request("POST", f"/dicomweb/{called}/studies", body=body, headers=headers)
        r = conn.getresponse()
        return r.status, r.getheader("content-type") or "", r.read()
    finally:
        conn.close()


def sop_items(answer: bytes, tag: str) -> list[dict]:
    """The items of a sequence (``00081199`` referenced, ``00081198`` failed) of a DICOM JSON answer."""
    ds = json.loads(answer)
    return [{"class": i.get("00081150", {}).get("Value", [""])[0],
             "uid": i.get("00081155", {}).get("Value", [""])[0],
             "reason": i.get("00081197", {}).get("Value", [None])[0]}
            for i in ds.get(tag, {}).get("Value", [])]


def make_study(n: int, size: int = 64) -> list:
    study_uid, series_uid = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = make_dataset(rows=size, cols=size, study_uid=study_uid, series_uid=series_uid, seed=i)
        ds.InstanceNumber = i + 1
        out.append(ds)
    return out


def _node(tmp_path: Path, model: Path, pacs_port: int, token_hash: str | None, **extra) -> Node:
    web: dict = {"port": 0, **extra.pop("web", {})}
    if token_hash is not None:
        web["stow_rs"] = {"tokens": [hash_password("another-token"), token_hash]}
    raw = node_config(tmp_path, port=free_port(), model_path=model,
                      destinations={"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                                             "port": pacs_port}},
                      routes=[{"called_ae": CALLED, "model": "tiny", "destinations": ["pacs"]},
                              {"called_ae": "MODALITY_ONLY", "model": "tiny", "destinations": ["pacs"],
                               "calling_ae": ["CR_ROOM1"]}],
                      stable=0.2, web=web, **extra)
    return Node(parse_config(raw, base_dir=tmp_path))


def _stored_nothing(node: Node) -> None:
    inst, _ = node.db.counts()
    assert sum(inst.values()) == 0, inst
    assert list(node.spool.tmp.iterdir()) == []  # no part left behind either
    assert not [p for p in node.spool.incoming.rglob("*") if p.is_file()]


def test_refused_requests_get_the_standard_status_and_store_nothing(tmp_path, tiny_model_path, token_hash):
    study = make_study(2)
    good = multipart([encoded(ds) for ds in study])
    with Receiver("PACS") as pacs, _node(tmp_path, tiny_model_path, pacs.port, token_hash) as node:
        port = node.web.address[1]
        status, _, _ = post(port, good, token=None)
        assert status == 401
        assert post(port, good, token="wrong-token")[0] == 401
        assert post(port, good, called="NOBODY")[0] == 404
        assert post(port, good, called="A" * 17)[0] == 404  # not even an AE title
        assert post(port, good, called="MODALITY_ONLY")[0] == 403  # its route allows CR_ROOM1 only
        assert post(port, good, content_type="application/dicom")[0] == 415
        assert post(port, good, content_type='multipart/related; type="application/dicom+xml"; '
                                             f'boundary={BOUNDARY}')[0] == 415
        assert post(port, good, content_type='multipart/related; type="application/dicom"')[0] == 400  # no boundary
        assert post(port, good, accept="application/dicom+xml")[0] == 406  # the XML answer only
        assert post(port, good, accept="application/dicom+json;q=0, application/dicom+xml")[0] == 406
        cut = good[:len(good) // 2]  # the second instance never arrives
        status, _, answer = post(port, cut)
        assert status == 400, answer
        assert post(port, multipart([encoded(study[0])], close=False))[0] == 400  # no closing boundary
        assert post(port, b"this is not multipart at all")[0] == 400
        assert post(port, multipart([]))[0] == 400  # no parts
        _stored_nothing(node)
        # the node keeps serving: the same study is then taken whole (XML preferred, JSON acceptable)
        status, ctype, answer = post(port, good, accept="application/dicom+xml, application/dicom+json;q=0.5")
        assert status == 200, answer
        assert ctype.startswith("application/dicom+json")
        assert {i["uid"] for i in sop_items(answer, "00081199")} == {str(ds.SOPInstanceUID) for ds in study}
        text = http_get(port, "/metrics")
        m = metric_samples(text)
        assert m[("dicom_node_instances_received_total", (("called_ae", CALLED), ("protocol", "stow-rs")))] == 2
        assert m[("dicom_node_instances_received_total", (("called_ae", CALLED), ("protocol", "dimse")))] == 0
        assert PATIENT_NAME not in text and PATIENT_ID not in text
        # the console's overview says where each called AE receives and how much came each way
        console = Browserless(node.web.url)
        console.login_with_token(_token(node))
        status, _, html = console.get("/")
        assert status == 200
        row = re.search(r'<table id="receiving">.*?<td>DR_KIM_STYLE</td>(.*?)</tr>', html, re.S).group(1)
        assert [c.strip() for c in re.findall(r"<td>(.*?)</td>", row, re.S)] == [
            f"127.0.0.1:{node.port}", "POST /dicomweb/DR_KIM_STYLE/studies", "0", "2"]


def http_get(port: int, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def test_a_body_that_stops_arriving_gets_408_and_stores_nothing(tmp_path, tiny_model_path, token_hash):
    """A client that sends half its body and falls silent is answered after node.network_timeout."""
    import socket
    import time

    study = make_study(2)
    body = multipart([encoded(ds) for ds in study])
    with Receiver("PACS") as pacs, _node(tmp_path, tiny_model_path, pacs.port, token_hash,
                                         node={"network_timeout": 1}) as node:
        port = node.web.address[1]
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            head = (f"POST /dicomweb/{CALLED}/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Content-Type: {RELATED}\r\nAuthorization: Bearer {TOKEN}\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()
            sock.sendall(head + body[:len(body) * 3 // 4])
            t0 = time.monotonic()
            answer = sock.recv(4096)
            waited = time.monotonic() - t0
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert 0.5 < waited < 10, waited
        _stored_nothing(node)
        assert post(port, body)[0] == 200  # and it keeps serving


def test_stow_rs_is_off_unless_configured(tmp_path, tiny_model_path):
    with Receiver("PACS") as pacs, _node(tmp_path, tiny_model_path, pacs.port, None) as node:
        status, _, answer = post(node.web.address[1], multipart([encoded(make_study(1)[0])]))
        assert status == 404, answer
        assert b"web.stow_rs" in answer
        _stored_nothing(node)


def test_failed_instances_are_listed_with_the_listeners_reasons(tmp_path, tiny_model_path, token_hash):
    """202 with a FailedSOPSequence when some fail, 409 when all fail: the reasons are the
    C-STORE statuses the listener gives for the same data sets; the rest is stored."""
    study = make_study(2)
    too_big = make_dataset(rows=256, cols=256, study_uid=str(study[0].StudyInstanceUID))  # 128 KiB of pixels
    not_storage = make_dataset(rows=16, cols=16, sop_class="1.2.840.10008.5.1.4.1.1.999.1")
    no_uid = make_dataset(rows=16, cols=16)
    del no_uid.SeriesInstanceUID
    with Receiver("PACS") as pacs, _node(tmp_path, tiny_model_path, pacs.port, token_hash,
                                         node={"max_instance_bytes": 100_000}) as node:
        port = node.web.address[1]
        body = multipart([encoded(study[0]), encoded(too_big), b"not DICOM", encoded(not_storage),
                          encoded(no_uid), encoded(study[1])])
        status, _, answer = post(port, body)
        assert status == 202, answer
        assert [i["uid"] for i in sop_items(answer, "00081199")] == [str(ds.SOPInstanceUID) for ds in study]
        failed = sop_items(answer, "00081198")
        assert [(i["uid"], i["reason"]) for i in failed] == [
            (str(too_big.SOPInstanceUID), 0xA700), ("", 0xC000), (str(not_storage.SOPInstanceUID), 0x0122),
            (str(no_uid.SOPInstanceUID), 0xC000)]
        assert failed[0]["class"] == "1.2.840.10008.5.1.4.1.1.1"
        status, _, answer = post(port, multipart([b"not DICOM", encoded(too_big)]))
        assert status == 409, answer
        assert [i["reason"] for i in sop_items(answer, "00081198")] == [0xC000, 0xA700]
        status, _, answer = post(port, multipart([encoded(make_study(1)[0])], part_type="image/jpeg"))
        assert status == 409 and [i["reason"] for i in sop_items(answer, "00081198")] == [0xC000]
        inst, _ = node.db.counts()
        assert sum(inst.values()) == 2  # the two good ones only
        assert list(node.spool.tmp.iterdir()) == []
        # a resend is idempotent, as for a C-STORE
        assert post(port, multipart([encoded(study[0])]))[0] == 200
        assert wait_for(lambda: len(pacs.uids()) == 2, 60), pacs.uids()


def test_a_full_spool_refuses_every_instance_while_it_arrives(tmp_path, tiny_model_path, token_hash):
    """Below storage.min_free_bytes the parts are dropped as they arrive (0xA700, as a C-STORE):
    409, nothing written to the spool."""
    study = make_study(3)
    with Receiver("PACS") as pacs, _node(tmp_path, tiny_model_path, pacs.port, token_hash,
                                         storage={"min_free_bytes": 10**15}) as node:
        status, _, answer = post(node.web.address[1], multipart([encoded(ds) for ds in study]))
        assert status == 409, answer
        failed = sop_items(answer, "00081198")
        assert [(i["uid"], i["reason"]) for i in failed] == [(str(ds.SOPInstanceUID), 0xA700) for ds in study]
        _stored_nothing(node)


def test_stow_rs_over_tls_and_wrong_tokens_are_limited(tmp_path, tiny_model_path, token_hash):
    """With web.tls the ingest is HTTPS like the console; after MAX_FAILURES wrong tokens from
    one address even the right one waits (429), as a console login does; a DIMSE resend of an
    instance STOW-RS brought (the same data set) is a duplicate."""
    from dicom_node.web.auth import MAX_FAILURES
    from tests.certs import make_pki
    from tests.nodeproc import send

    pki = make_pki(tmp_path / "pki")
    study = make_study(2)
    with Receiver("PACS") as pacs, _node(tmp_path, tiny_model_path, pacs.port, token_hash,
                                         web={"tls": {"cert": str(pki.server_cert), "key": str(pki.server_key)}}) as node:
        port, trust = node.web.address[1], ssl.create_default_context(cafile=str(pki.ca))
        assert node.web.url.startswith("https://")
        with pytest.raises(ssl.SSLError):
            post(port, multipart([encoded(study[0])]), tls=ssl.create_default_context())  # untrusted certificate
        status, _, answer = post(port, multipart([encoded(ds) for ds in study]), tls=trust)
        assert status == 200, answer
        # the same data set over DIMSE (its file meta written by pynetdicom, not the client): a duplicate
        assert send(node.port, study[:1], called=CALLED, native_only=True) == [0]
        for _ in range(MAX_FAILURES):
            assert post(port, multipart([encoded(study[0])]), token="guess", tls=trust)[0] == 401
        status, _, answer = post(port, multipart([encoded(study[0])]), tls=trust)
        assert status == 429, answer
        inst, _ = node.db.counts()
        assert sum(inst.values()) == 2
        received = {tuple(sorted(labels.items())): n for labels, n in node.db.counters.values()["received"]}
        assert received == {(("called_ae", CALLED), ("protocol", "stow-rs")): 2}  # duplicates are not counted


def _process_config(tmp_path: Path, model: Path, destinations: dict, token_hash: str, web_port: int) -> dict:
    cfg = node_config(tmp_path, port=free_port(), model_path=model, stable=1.0, destinations=destinations,
                      routes=[{"called_ae": CALLED, "model": "tiny", "destinations": list(destinations)}],
                      web={"port": web_port, "stow_rs": {"tokens": [token_hash]}})
    return cfg


@pytest.mark.interop
def test_a_study_posted_over_stow_rs_is_translated_and_delivered_to_storescp(tmp_path, tiny_model_path,
                                                                             token_hash):
    from tests.peers import StoreSCP

    archive = StoreSCP(tmp_path / "archive").start()
    web_port = free_port()
    cfg = _process_config(tmp_path, tiny_model_path, {"archive": {
        "type": "dicom", "ae_title": archive.ae_title, "host": "127.0.0.1", "port": archive.port}},
        token_hash, web_port)
    node = NodeProcess(write_config(tmp_path / "node.yaml", cfg), cfg["node"]["port"], tmp_path / "node.log")
    study = make_study(3)
    try:
        node.start()
        status, _, answer = post(web_port, multipart([encoded(ds) for ds in study]))
        assert status == 200, answer
        sent = {str(ds.SOPInstanceUID) for ds in study}
        assert {i["uid"] for i in sop_items(answer, "00081199")} == sent
        assert wait_for(lambda: len(archive.files()) == 3, 60), node.log()[-3000:]
        outputs = [pydicom.dcmread(p, stop_before_pixels=True) for p in archive.files()]
        assert {str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) for sc in outputs} == sent
        assert all(str(sc.SOPClassUID) == "1.2.840.10008.5.1.4.1.1.7" for sc in outputs)  # Secondary Capture
        assert all(str(sc.StudyInstanceUID) == str(study[0].StudyInstanceUID) for sc in outputs)
        m = metric_samples(http_get(web_port, "/metrics"))
        assert m[("dicom_node_instances_received_total", (("called_ae", CALLED), ("protocol", "stow-rs")))] == 3
        status_json = subprocess.run([sys.executable, "-m", "dicom_node", "status", "--json", "--config",
                                      str(node.config_path)], capture_output=True, text=True, timeout=60)
        assert status_json.returncode == 0, status_json.stderr
        assert json.loads(status_json.stdout)["received"] == {CALLED: {"stow-rs": 3}}
        log = node.log()
        assert "STOW-RS to DR_KIM_STYLE: 3 instance(s) stored" in log
        assert PATIENT_NAME not in log and PATIENT_ID not in log and TOKEN not in log
    finally:
        node.kill9()
        archive.stop()


def test_kill9_during_stow_rs_ingest_loses_no_acknowledged_instance(tmp_path, tiny_model_path, token_hash):
    """Studies posted one instance per request while the node is killed: every instance of a
    request answered 200 is translated and delivered after the restart, once."""
    with Receiver("PACS") as pacs:
        web_port = free_port()
        cfg = _process_config(tmp_path, tiny_model_path, {
            "pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port},
            "outbox": {"type": "folder", "path": str(tmp_path / "outbox")}}, token_hash, web_port)
        cfg["study_stable_seconds"] = 1.5
        node = NodeProcess(write_config(tmp_path / "node.yaml", cfg), cfg["node"]["port"], tmp_path / "node.log")
        sources = make_study(30)
        acked: list[str] = []
        done = threading.Event()

        def sender() -> None:
            try:
                for start in range(0, len(sources), 2):  # two instances per request
                    batch = sources[start:start + 2]
                    try:
                        status, _, answer = post(web_port, multipart([encoded(ds) for ds in batch]))
                    except (OSError, http.client.HTTPException):
                        return  # the node is gone: this request was never answered
                    if status != 200:
                        return
                    acked.extend(i["uid"] for i in sop_items(answer, "00081199"))
            finally:
                done.set()

        try:
            node.start()
            t = threading.Thread(target=sender, daemon=True)
            t.start()
            acked_at_kill = kill_while_sending(node, tmp_path, acked, done, len(sources),
                                               acked_within=60, sender_within=30, settled_within=90)
        finally:
            node.kill9()
        assert_each_acknowledged_delivered_once(tmp_path, pacs, acked_at_kill, sources)


def test_stow_rs_config_keys(tmp_path, tiny_model_path, token_hash):
    from dicom_node.config import ConfigError

    def web(stow_rs=None) -> dict:
        return node_config(tmp_path, port=free_port(), model_path=tiny_model_path,
                           destinations={"outbox": {"type": "folder", "path": str(tmp_path / "outbox")}},
                           routes=[{"called_ae": CALLED, "model": "tiny", "destinations": ["outbox"]}],
                           web={"port": 0, **({} if stow_rs is None else {"stow_rs": stow_rs})})

    assert parse_config(web({"tokens": [token_hash]}), base_dir=tmp_path).web.stow_rs_tokens == [token_hash]
    assert parse_config(web(), base_dir=tmp_path).web.stow_rs_tokens is None
    for bad, where in (({"tokens": ["plain-text-token"]}, "web.stow_rs.tokens[0]: must be an Argon2 hash"),
                       ({"tokens": []}, "web.stow_rs.tokens: at least one token hash"),
                       ({}, "web.stow_rs.tokens: required key missing"),
                       ({"tokens": [token_hash], "users": {}}, "web.stow_rs.users: unknown key")):
        with pytest.raises(ConfigError) as err:
            parse_config(web(bad), base_dir=tmp_path)
        assert where in str(err.value), str(err.value)
        assert "plain-text-token" not in str(err.value)  # a token pasted in the wrong place is not echoed


@pytest.mark.parametrize("header, ok", [
    ("", True), ("*/*", True), ("application/*", True), ("application/json", True),
    ("Application/DICOM+JSON; q=0.9", True), ("application/dicom+xml, */*;q=0.1", True),
    ("application/dicom+xml", False), ("text/html", False), ("application/dicom+json;q=0", False),
    ("application/dicom+json;q=junk", False)])
def test_accept_header_rules(header, ok):
    from dicom_node.web.media_types import accepts_json

    assert accepts_json(header) is ok

"""The STOW-RS client against real archives: Debian's Orthanc with its DICOMweb plugin (basic
auth), and a small loopback HTTP(S) server where Orthanc cannot show a case (bearer tokens,
client certificates, HTTP 5xx, a warning in the answer).

Why: the dicomweb destination is only as good as this client's reading of the archive's
answer; an instance reported as failed must fail alone, and one the archive already holds
must count as delivered, or a resend after a crash would loop forever.
"""
from __future__ import annotations

import json
import ssl
import threading
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from dicom_node.stow_client import StowAuth, StowTarget, StowTLS, _requests, probe, store, url_problem
from tests.factory import make_dataset, phantom, write
from tests.peers import Orthanc, free_port

PASSWORD = "correct horse battery"


def make_study(folder: Path, count: int, *, study: str | None = None, size: int = 32) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    study, series = study or generate_uid(), generate_uid()
    files = []
    for i in range(count):
        ds = make_dataset(phantom(size, size, 12, seed=i), study_uid=study, series_uid=series)
        ds.InstanceNumber = i + 1
        files.append(Path(write(ds, folder / f"{study[-6:]}-{i:03d}.dcm")))
    return files


def sop_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(str(path), stop_before_pixels=True).SOPInstanceUID)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc-dicomweb"), dicomweb=True, users={"node": PASSWORD})
    pacs.start()
    yield pacs
    pacs.stop()


@pytest.fixture
def password_file(tmp_path) -> Path:
    p = tmp_path / "password"
    p.write_text(PASSWORD + "\n")
    return p


def orthanc_target(orthanc: Orthanc, password_file: Path, **kw) -> StowTarget:
    return StowTarget(orthanc.dicomweb_url, StowAuth(user="node", password_file=password_file), timeout=20, **kw)


# ---------------------------------------------------------------------------- Orthanc


@pytest.mark.interop
def test_study_arrives_in_orthanc_with_basic_auth_and_a_resend_counts_as_delivered(orthanc, password_file, tmp_path):
    files = make_study(tmp_path / "a", 3) + make_study(tmp_path / "b", 2)
    before = orthanc.instance_count()
    results = store(orthanc_target(orthanc, password_file), files)
    assert [r.path for r in results] == files
    assert all(r.ok for r in results), [r.error for r in results]
    assert {sop_uid(f) for f in files} <= set(orthanc.sop_instance_uids())
    # the archive already holds them: delivered again, stored once
    assert all(r.ok for r in store(orthanc_target(orthanc, password_file), files))
    assert orthanc.instance_count() == before + 5


@pytest.mark.interop
def test_size_limit_splits_a_study_into_several_requests_and_all_arrive(orthanc, password_file, tmp_path):
    files = make_study(tmp_path / "s", 5, size=64)
    one = files[0].stat().st_size
    target = orthanc_target(orthanc, password_file, max_request_bytes=2 * one + 10)
    from dicom_node.stow_client import _inspect

    assert [len(b) for b in _requests([_inspect(i, f) for i, f in enumerate(files)], target.max_request_bytes)] \
        == [2, 2, 1]
    assert all(r.ok for r in store(target, files))
    assert {sop_uid(f) for f in files} <= set(orthanc.sop_instance_uids())


@pytest.mark.interop
def test_instance_failed_by_orthanc_fails_alone_with_its_reason(orthanc, password_file, tmp_path):
    files = make_study(tmp_path / "f", 3)
    bad = files[1]
    ds = __import__("pydicom").dcmread(str(bad))
    del ds.SeriesInstanceUID  # Orthanc cannot index it: FailedSOPSequence, FailureReason 0xC000
    ds.save_as(str(bad))
    results = store(orthanc_target(orthanc, password_file), files)
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].status == 0xC000
    assert "failed the instance" in results[1].error and "0xC000" in results[1].error
    stored = set(orthanc.sop_instance_uids())
    assert sop_uid(files[0]) in stored and sop_uid(files[2]) in stored and sop_uid(bad) not in stored


@pytest.mark.interop
def test_wrong_password_fails_every_instance_without_showing_it(orthanc, tmp_path):
    files = make_study(tmp_path / "w", 2)
    wrong = tmp_path / "wrong"
    wrong.write_text("guess\n")
    target = StowTarget(orthanc.dicomweb_url, StowAuth(user="node", password_file=wrong), timeout=20)
    results = store(target, files)
    assert not any(r.ok for r in results)
    assert all("refused our credentials (HTTP 401)" in r.error and "guess" not in r.error for r in results)
    assert probe(target) == f"http://127.0.0.1:{orthanc.http_port} refused our credentials (HTTP 401)"


@pytest.mark.interop
def test_probe_reaches_orthanc(orthanc, password_file):
    assert probe(orthanc_target(orthanc, password_file)) is None


def test_connection_refused_fails_every_instance_and_probe_says_so(tmp_path):
    files = make_study(tmp_path / "r", 2)
    port = free_port()
    target = StowTarget(f"http://127.0.0.1:{port}/dicom-web", timeout=5)
    results = store(target, files)
    assert [r.error for r in results] == [f"cannot connect to http://127.0.0.1:{port} (refused)"] * 2
    assert probe(target) == f"cannot connect to http://127.0.0.1:{port} (refused)"


def test_unreadable_file_fails_alone_and_missing_password_file_is_named(tmp_path):
    files = make_study(tmp_path / "u", 1)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    target = StowTarget(f"http://127.0.0.1:{free_port()}", StowAuth(user="n", password_file=tmp_path / "nope"))
    results = store(target, [junk, *files])
    assert results[0].error.startswith("cannot read DICOM file")
    assert results[1].error == f"cannot read the secret file {tmp_path / 'nope'} (FileNotFoundError)"


def test_url_problems():
    assert url_problem("https://pacs.example.org/dicom-web") is None
    assert "credentials" in url_problem("https://user:pw@pacs.example.org/dicom-web")
    assert "credentials" in url_problem("https://token@pacs.example.org/dicom-web")
    assert url_problem("ftp://pacs/dicom-web") == "must be an http:// or https:// URL with a host"
    assert "query" in url_problem("https://pacs/dicom-web?token=x")


# ------------------------------------------------------------------ a loopback HTTP(S) archive


class Archive:
    """A loopback HTTP(S) server that records each request and answers as told."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[dict] = []
        self.answer = lambda sops: (200, _response(sops))
        archive = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                msg = BytesParser(policy=HTTP).parsebytes(
                    b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body)
                parts = [p.get_payload(decode=True) for p in msg.iter_parts()]
                import io

                import pydicom

                sops = [str(pydicom.dcmread(io.BytesIO(p)).SOPInstanceUID) for p in parts]
                archive.requests.append({"path": self.path, "headers": dict(self.headers), "sops": sops,
                                         "types": [p.get_content_type() for p in msg.iter_parts()]})
                status, payload = archive.answer(sops)
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}/base/dicom-web/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _response(referenced: list[str], failed: dict[str, int] | None = None, warnings: dict[str, int] | None = None,
              ) -> bytes:
    def item(uid: str, tag: str | None = None, code: int | None = None) -> dict:
        out = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.7"]},
               "00081155": {"vr": "UI", "Value": [uid]}}
        if tag:
            out[tag] = {"vr": "US", "Value": [code]}
        return out

    warnings = warnings or {}
    doc = {"00081199": {"vr": "SQ", "Value": [item(u, "00081196" if u in warnings else None, warnings.get(u))
                                              for u in referenced]},
           "00081198": {"vr": "SQ", "Value": [item(u, "00081197", c) for u, c in (failed or {}).items()]}}
    return json.dumps(doc).encode()


@pytest.fixture
def archive():
    a = Archive()
    yield a
    a.close()


def test_one_request_per_study_multipart_related_with_bearer_token_from_env(archive, tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHIVE_TOKEN", "t0ken-xyz")
    a, b = make_study(tmp_path / "a", 2), make_study(tmp_path / "b", 1)
    results = store(StowTarget(archive.url(), StowAuth(bearer_env="ARCHIVE_TOKEN"), timeout=10), [a[0], b[0], a[1]])
    assert all(r.ok for r in results)
    assert [r["sops"] for r in archive.requests] == [[sop_uid(a[0]), sop_uid(a[1])], [sop_uid(b[0])]]
    first = archive.requests[0]
    assert first["path"] == "/base/dicom-web/studies"
    assert first["headers"]["Authorization"] == "Bearer t0ken-xyz"
    assert first["headers"]["Content-Type"].startswith('multipart/related; type="application/dicom"; boundary=')
    assert first["types"] == ["application/dicom"] * 2


def test_bearer_token_from_file_and_unset_variable(archive, tmp_path, monkeypatch):
    files = make_study(tmp_path / "t", 1)
    token = tmp_path / "token"
    token.write_text("file-token\n")
    assert store(StowTarget(archive.url(), StowAuth(bearer_file=token)), files)[0].ok
    assert archive.requests[-1]["headers"]["Authorization"] == "Bearer file-token"
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    result = store(StowTarget(archive.url(), StowAuth(bearer_env="NO_SUCH_TOKEN")), files)[0]
    assert result.error == "environment variable NO_SUCH_TOKEN is not set or empty"


def test_failed_warning_duplicate_and_unconfirmed_instances_each_get_their_own_outcome(archive, tmp_path):
    files = make_study(tmp_path / "m", 5)
    uids = [sop_uid(f) for f in files]
    archive.answer = lambda sops: (202, _response([uids[0], uids[1]], failed={uids[2]: 0xA700, uids[3]: 0x0111},
                                                  warnings={uids[1]: 0xB000}))
    results = store(StowTarget(archive.url()), files)
    assert [r.ok for r in results] == [True, True, False, True, False]
    assert results[1].warning == "coercion of data elements (0xB000)" and results[1].status == 0xB000
    assert results[2].status == 0xA700 and "out of resources (0xA700)" in results[2].error
    assert results[3].status == 0x0111  # the archive already holds it: delivered
    assert "did not confirm the instance (HTTP 202)" in results[4].error


def test_http_5xx_fails_every_instance_of_the_request(archive, tmp_path):
    files = make_study(tmp_path / "x", 2)
    archive.answer = lambda sops: (503, b"busy")
    results = store(StowTarget(archive.url()), files)
    assert [r.ok for r in results] == [False, False]
    assert results[0].error == f"http://127.0.0.1:{archive.port} answered HTTP 503 without a STOW-RS response"


def test_answer_before_the_body_is_read_is_still_read(tmp_path):
    """An archive (or its proxy) that answers 413 after the headers and closes while we are
    still sending: the answer is reported, not a broken pipe."""
    import socket

    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            conn.shutdown(socket.SHUT_WR)
            threading.Event().wait(0.3)  # a lingering close, as web servers do

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        files = make_study(tmp_path / "big", 3, size=1024)  # 6 MB: more than the socket buffers
        results = store(StowTarget(f"http://127.0.0.1:{port}/dicom-web", timeout=10), files)
        assert results[0].error == (f"http://127.0.0.1:{port} refused the request as too large (HTTP 413): "
                                    "lower max_request_bytes")
    finally:
        thread.join(10)
        srv.close()


def test_https_with_ca_and_client_certificate(tmp_path):
    from tests.certs import make_pki

    pki = make_pki(tmp_path / "pki")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    ctx.load_verify_locations(pki.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: no client certificate, no request
    archive = Archive(tls=ctx)
    try:
        files = make_study(tmp_path / "tls", 1)
        good = StowTLS(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
        assert store(StowTarget(archive.url("https"), tls=good, timeout=10), files)[0].ok
        assert probe(StowTarget(archive.url("https"), tls=good, timeout=10)) is None  # GET not served: 501 is fine
        untrusted = store(StowTarget(archive.url("https"), tls=StowTLS(ca=pki.rogue_ca, cert=pki.client_cert,
                                                                      key=pki.client_key), timeout=10), files)[0]
        assert untrusted.error.startswith(f"TLS: the certificate of https://127.0.0.1:{archive.port} is not trusted")
        assert len(archive.requests) == 1
    finally:
        archive.close()

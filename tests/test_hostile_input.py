"""Hostile or careless DICOM peers (issue 24): the node stays available and refuses with a status.

Each test runs a real :class:`dicom_node.node.Node` on a kernel-chosen port on 127.0.0.1 and
talks to it over real TCP connections and pynetdicom associations, with bounded waits.
"""
from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from dicom_node.config import parse_config
from dicom_node.node import Node
from tests.factory import make_dataset
from tests.nodeproc import node_config, send

CALLED = "DR_KIM_STYLE"


def make_node(tmp_path: Path, model: Path, **extra) -> Node:
    """A node with one route to a folder, from a config dict run through the real parser."""
    raw = node_config(tmp_path, port=11112, model_path=model,
                      destinations={"outbox": {"type": "folder", "path": str(tmp_path / "outbox")}},
                      routes=[{"called_ae": CALLED, "model": "tiny", "destinations": ["outbox"]}],
                      stable=0.3, **extra)
    config = parse_config(raw, base_dir=tmp_path)
    config.node.port = 0
    return Node(config)


def store_until_accepted(port: int, ds, within: float) -> tuple[int | None, float]:
    """C-STORE ``ds``, retrying while the association is refused; (status, seconds it took)."""
    t0 = time.monotonic()
    while True:
        try:
            return send(port, [ds], called=CALLED)[0], time.monotonic() - t0
        except ConnectionError:
            if time.monotonic() - t0 > within:
                return None, time.monotonic() - t0
            time.sleep(0.2)


# -- item 4: silent TCP connections -----------------------------------------------------------

def test_silent_connections_are_dropped_after_request_timeout(tmp_path, tiny_model_path):
    """max_associations sockets that never speak: a real sender gets in after request_timeout."""
    node = make_node(tmp_path, tiny_model_path, node={"max_associations": 4, "request_timeout": 1.5,
                                                      "acse_timeout": 30})
    with node:
        silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(4)]
        try:
            time.sleep(0.3)
            status, took = store_until_accepted(node.port, make_dataset(rows=32, cols=32), within=8)
            assert status == 0, f"no real sender got in within {took:.1f} s"
            assert took < 6
        finally:
            for s in silent:
                s.close()


def test_closed_silent_connections_free_their_slot_at_once(tmp_path, tiny_model_path):
    """Connections closed before asking for an association do not wait out any timeout."""
    node = make_node(tmp_path, tiny_model_path, node={"max_associations": 4, "request_timeout": 30,
                                                      "acse_timeout": 30})
    with node:
        silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(4)]
        time.sleep(0.3)
        for s in silent[:3]:
            s.close()
        try:
            time.sleep(0.5)
            status, took = store_until_accepted(node.port, make_dataset(rows=32, cols=32), within=5)
            assert status == 0 and took < 2, f"status {status} after {took:.1f} s"
        finally:
            silent[3].close()


# -- item 6: AE titles with control characters --------------------------------------------------

def raw_association_request(calling: bytes, called: bytes) -> bytes:
    """An A-ASSOCIATE-RQ PDU (Verification) whose AE title fields carry these exact bytes
    (pynetdicom refuses to encode such titles, so valid placeholders are replaced)."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context
    from pynetdicom.sop_class import Verification

    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title, prim.called_ae_title = "Q" * 16, "Z" * 16
    cx = build_context(Verification)
    cx.context_id = 1
    prim.presentation_context_definition_list = [cx]
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    prim.user_information = [max_length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return pdu.encode().replace(b"Q" * 16, calling.ljust(16)).replace(b"Z" * 16, called.ljust(16))


def answer_pdu_type(port: int, pdu: bytes) -> int:
    """Send ``pdu`` on a new connection; the type of the PDU that answers it (0: none)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(pdu)
        try:
            first = s.recv(1)
        except OSError:
            return 0
        return first[0] if first else 0


@pytest.mark.parametrize("calling, called, which", [
    (b"EVIL\nFAKE LINE", CALLED.encode(), "calling"),
    (b"MODALITY", b"DR_KIM\x1b[31m", "called"),
    (b"\x1b]0;pwned\x07", CALLED.encode(), "calling"),
])
def test_ae_titles_with_control_bytes_are_rejected_on_one_escaped_line(tmp_path, tiny_model_path, caplog,
                                                                       calling, called, which):
    import logging

    node = make_node(tmp_path, tiny_model_path)
    with node, caplog.at_level(logging.INFO):
        assert answer_pdu_type(node.port, raw_association_request(calling, called)) == 0x03  # A-ASSOCIATE-RJ
        assert send(node.port, [make_dataset(rows=32, cols=32)], called=CALLED) == [0]  # still serving
    rejected = [r.getMessage() for r in caplog.records if "association rejected" in r.getMessage()]
    assert len(rejected) == 1 and f"invalid {which} AE title" in rejected[0], rejected
    bad = (calling if which == "calling" else called).decode("ascii")
    assert bad.encode("unicode_escape").decode("ascii") in rejected[0]
    for record in caplog.records:
        text = record.getMessage()
        assert "\n" not in text and "\x1b" not in text and "\x07" not in text, text
        assert record.exc_info is None, text


def tls_echo(port: int, ctx) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE("TLS_SCU")
    ae.add_requested_context(Verification)
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = ae.connection_timeout = 8
    assoc = ae.associate("127.0.0.1", port, ae_title=CALLED, tls_args=(ctx, "127.0.0.1"))
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def test_a_silent_connection_does_not_stop_the_tls_listener(tmp_path, tiny_model_path):
    """pynetdicom did the TLS handshake in its accept loop: one silent TCP connection blocked
    every sender; a client without a certificate is still refused."""
    from dicom_node.config import TLSSettings
    from dicom_node.tls import client_context
    from tests.certs import make_pki

    pki = make_pki(tmp_path / "pki")
    node = make_node(tmp_path, tiny_model_path, node={"tls": {
        "cert": str(pki.server_cert), "key": str(pki.server_key), "ca": str(pki.ca), "require_client_cert": True}})
    good = client_context(TLSSettings(cert=pki.client_cert, key=pki.client_key, ca=pki.ca))
    with node:
        silent = socket.create_connection(("127.0.0.1", node.port))
        try:
            time.sleep(0.3)
            t0 = time.monotonic()
            assert tls_echo(node.port, good)
            assert time.monotonic() - t0 < 3
            assert not tls_echo(node.port, client_context(TLSSettings(ca=pki.ca)))
            assert tls_echo(node.port, good)
        finally:
            silent.close()


def test_pydicom_is_imported_before_the_node_starts_a_thread(tmp_path, tiny_model_path):
    """Two threads importing pydicom for the first time at once can see it half-initialised
    ("cannot import name 'UID' from partially initialized module"): the node failed to start
    with exit 2.  In a fresh interpreter, every thread the node starts finds pydicom loaded."""
    import subprocess
    import sys

    import yaml

    cfg = node_config(tmp_path, port=11112, model_path=tiny_model_path,
                      destinations={"outbox": {"type": "folder", "path": str(tmp_path / "outbox")}},
                      routes=[{"called_ae": CALLED, "model": "tiny", "destinations": ["outbox"]}])
    (tmp_path / "node.yaml").write_text(yaml.safe_dump(cfg))
    script = f"""
import sys, threading
from dicom_node.config import load_config
from dicom_node.node import Node
seen = []
start = threading.Thread.start
def checked(self, *a, **k):
    seen.append("pydicom.uid" in sys.modules and hasattr(sys.modules["pydicom.uid"], "UID"))
    return start(self, *a, **k)
threading.Thread.start = checked
config = load_config({str(tmp_path / "node.yaml")!r})
config.node.port = 0
node = Node(config)
node.start()
node.stop()
print("threads", len(seen), "without pydicom", seen.count(False))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("threads")][-1]
    assert line.endswith("without pydicom 0") and not line.startswith("threads 0"), line

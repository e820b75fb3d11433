"""DICOM over TLS: real pynetdicom associations on 127.0.0.1 with throw-away certificates.

Why: TLS is how a site keeps strangers from sending to (or impersonating) the node.  The
contexts must actually verify: a client without a certificate from the configured CA is
refused when client certificates are required, and a client does not talk to a server
whose certificate it cannot verify.
"""
from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from dicom_node.config import DestinationSettings, TLSSettings
from dicom_node.destinations import deliver
from dicom_node.errors import UserError
from dicom_node.tls import client_context, server_context
from tests.certs import PKI, make_pki
from tests.conftest import require_tool
from tests.factory import CR_STORAGE, make_dataset, write


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _start_scp(tls: TLSSettings, received: list):
    def on_store(event):
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ae = AE("TLS_SCP")
    ae.add_supported_context(Verification)
    ae.add_supported_context(CR_STORAGE)
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 5
    return ae.start_server(("127.0.0.1", 0), block=False, ssl_context=server_context(tls),
                           evt_handlers=[(evt.EVT_C_STORE, on_store)])


def _echo(port: int, ctx: ssl.SSLContext) -> bool:
    ae = AE("TLS_SCU")
    ae.add_requested_context(Verification)
    ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = ae.connection_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="TLS_SCP", tls_args=(ctx, "127.0.0.1"))
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


@pytest.fixture()
def mtls_server(pki):
    """A storage SCP demanding a client certificate signed by our CA."""
    received: list[str] = []
    server = _start_scp(TLSSettings(cert=pki.server_cert, key=pki.server_key, ca=pki.ca,
                                    require_client_cert=True), received)
    yield server.server_address[1], received
    server.shutdown()


def test_mutual_tls_association_succeeds(pki, mtls_server):
    port, _ = mtls_server
    ctx = client_context(TLSSettings(cert=pki.client_cert, key=pki.client_key, ca=pki.ca))
    assert _echo(port, ctx)


def test_client_without_certificate_is_refused(pki, mtls_server):
    port, _ = mtls_server
    assert not _echo(port, client_context(TLSSettings(ca=pki.ca)))


def test_client_with_certificate_from_another_ca_is_refused(pki, mtls_server):
    port, _ = mtls_server
    ctx = client_context(TLSSettings(cert=pki.rogue_client_cert, key=pki.rogue_client_key, ca=pki.ca))
    assert not _echo(port, ctx)


def test_client_refuses_server_it_cannot_verify(pki, mtls_server):
    port, _ = mtls_server
    ctx = client_context(TLSSettings(cert=pki.client_cert, key=pki.client_key, ca=pki.rogue_ca))
    assert not _echo(port, ctx)


def test_optional_client_certificate_allows_anonymous_client(pki):
    received: list[str] = []
    server = _start_scp(TLSSettings(cert=pki.server_cert, key=pki.server_key, ca=pki.ca), received)
    try:
        assert _echo(server.server_address[1], client_context(TLSSettings(ca=pki.ca)))
    finally:
        server.shutdown()


def test_tls_destination_delivers_and_plain_client_is_refused(pki, mtls_server, tmp_path):
    port, received = mtls_server
    ds = make_dataset(rows=32, cols=32)
    path = Path(write(ds, tmp_path / "a.dcm"))
    dest = DestinationSettings(name="pacs", type="dicom", ae_title="TLS_SCP", host="127.0.0.1", port=port,
                               tls=TLSSettings(cert=pki.client_cert, key=pki.client_key, ca=pki.ca), timeout=5)
    [result] = deliver(dest, [path], calling_ae="NODE")
    assert result.ok, result.error
    assert received == [ds.SOPInstanceUID]

    plain = DestinationSettings(name="plain", type="dicom", ae_title="TLS_SCP", host="127.0.0.1", port=port,
                                timeout=3)
    [result] = deliver(plain, [path], calling_ae="NODE")
    assert not result.ok and result.error
    assert received == [ds.SOPInstanceUID]


def test_contexts_require_tls_1_2(pki):
    server = server_context(TLSSettings(cert=pki.server_cert, key=pki.server_key, ca=pki.ca,
                                        require_client_cert=True))
    client = client_context(TLSSettings(ca=pki.ca))
    assert server.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert client.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname


def test_bad_files_are_user_errors(pki, tmp_path):
    with pytest.raises(UserError, match="not found"):
        server_context(TLSSettings(cert=tmp_path / "missing.pem", key=pki.server_key))
    with pytest.raises(UserError, match="cannot load"):
        server_context(TLSSettings(cert=pki.server_cert, key=pki.client_key))  # key of another cert
    with pytest.raises(UserError):
        server_context(TLSSettings(cert=pki.server_cert, key=pki.server_key, require_client_cert=True))


# ----------------------------------------------------------- dcmtk as the other side (interop)


@pytest.mark.interop
def test_dcmtk_echoscu_against_our_server_context(pki, mtls_server):
    """dcmtk (OpenSSL, BCP 195 profile) talks to our listener context; without a
    client certificate it is refused."""
    port, _ = mtls_server
    exe = require_tool("echoscu")
    base = [exe, "-aec", "TLS_SCP", "-to", "5", "-ta", "5", "-td", "5"]
    with_cert = subprocess.run(base + ["+tls", str(pki.client_key), str(pki.client_cert), "-pw", "+cf", str(pki.ca),
                                       "127.0.0.1", str(port)], capture_output=True, text=True, timeout=30)
    assert with_cert.returncode == 0, with_cert.stderr
    anonymous = subprocess.run(base + ["+tla", "+cf", str(pki.ca), "127.0.0.1", str(port)],
                               capture_output=True, text=True, timeout=30)
    assert anonymous.returncode != 0


@pytest.mark.interop
def test_tls_destination_to_dcmtk_storescp(pki, tmp_path):
    """Our client context delivers to dcmtk storescp over TLS; without a client certificate,
    or not trusting the server's CA, it does not."""
    from tests.peers import free_port, wait_for_port

    exe = require_tool("storescp")
    out = tmp_path / "received"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen([exe, "-aet", "SCP", "-od", str(out), "+tls", str(pki.server_key), str(pki.server_cert),
                             "-pw", "+cf", str(pki.ca), "-rc", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc=proc)
        path = Path(write(make_dataset(rows=16, cols=16), tmp_path / "a.dcm"))

        def send(tls: TLSSettings):
            dest = DestinationSettings(name="scp", type="dicom", ae_title="SCP", host="127.0.0.1", port=port,
                                       tls=tls, timeout=5)
            return deliver(dest, [path], calling_ae="NODE")[0]

        assert send(TLSSettings(cert=pki.client_cert, key=pki.client_key, ca=pki.ca)).ok
        assert len(list(out.iterdir())) == 1
        assert not send(TLSSettings(ca=pki.ca)).ok  # storescp -rc requires a client certificate
        untrusted = send(TLSSettings(cert=pki.client_cert, key=pki.client_key, ca=pki.rogue_ca))
        assert not untrusted.ok and "TLS handshake" in untrusted.error
        assert len(list(out.iterdir())) == 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)

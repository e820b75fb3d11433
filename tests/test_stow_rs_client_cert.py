"""STOW-RS ingest by client certificate (``web.stow_rs.client_ca``, ``subjects``), real TLS on loopback.

The certificates are made with the ``openssl`` command line (:mod:`tests.certs`); the client is
``http.client`` with a plain :mod:`ssl` context, the node runs in this process.
"""
from __future__ import annotations

import http.client
import ssl
import subprocess

import pytest

from dicom_node.config import ConfigError, parse_config
from tests.certs import make_cert, make_pki
from tests.nodeproc import Receiver, free_port, node_config
from tests.test_stow_rs import CALLED, _node, _stored_nothing, encoded, make_study, multipart, post, sop_items
from tests.test_stow_rs_clients import OTHER, routed_node
from tests.test_web import Browserless, _token

# openssl's -subj form: a subject with a comma in a value, so the RFC 4514 escaping is exercised
LISTED_SUBJECT = "/C=DE/O=Hospital, Radiology/CN=modality gateway 1"


def _client(pki, cert=None, key=None) -> ssl.SSLContext:
    """A client that trusts the node's CA and presents ``cert`` when given."""
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _rfc2253(cert) -> str:
    """The subject as openssl prints it in RFC 2253/4514 form: what an operator pastes into subjects."""
    out = subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-subject", "-nameopt", "RFC2253"],
                         capture_output=True, text=True, check=True).stdout.strip()
    return out.removeprefix("subject=").strip()


@pytest.fixture()
def pki(tmp_path):
    pki = make_pki(tmp_path / "pki")
    ca = (pki.ca, pki.ca.with_suffix(".key"))
    pki.listed = make_cert(pki.ca.parent, "listed", ca, server=False, subject=LISTED_SUBJECT)
    pki.unlisted = (pki.client_cert, pki.client_key)  # CN=client, same CA
    return pki


def test_a_client_certificate_of_the_configured_ca_posts_without_a_token(tmp_path, tiny_model_path, pki):
    from dicom_node.web.auth import hash_password

    token = "stow-cert-test-token"
    subject = _rfc2253(pki.listed[0])
    assert subject == "CN=modality gateway 1,O=Hospital\\, Radiology,C=DE"  # openssl's own form
    web = {"tls": {"cert": str(pki.server_cert), "key": str(pki.server_key)},
           "stow_rs": {"tokens": [hash_password(token)], "client_ca": str(pki.ca), "subjects": [subject]}}
    study = make_study(3)
    with Receiver("PACS") as pacs, _node(tmp_path, tiny_model_path, pacs.port, None, web=web) as node:
        port = node.web.address[1]
        # refused: no certificate and no token; a certificate of another CA (TLS 1.3: the server's
        # alert arrives when the client reads); a certificate of the CA whose subject is not listed
        status, _, answer = post(port, multipart([encoded(study[0])]), token=None, tls=_client(pki))
        assert status == 401 and b"client certificate" in answer, answer
        with pytest.raises((ssl.SSLError, ConnectionError)):
            post(port, multipart([encoded(study[0])]), token=None,
                 tls=_client(pki, pki.rogue_client_cert, pki.rogue_client_key))
        status, _, answer = post(port, multipart([encoded(study[0])]), token=None, tls=_client(pki, *pki.unlisted))
        assert status == 403 and b"web.stow_rs.subjects" in answer, answer
        _stored_nothing(node)
        # accepted: the listed certificate without a token
        status, _, answer = post(port, multipart([encoded(study[0])]), token=None, tls=_client(pki, *pki.listed))
        assert status == 200, answer
        assert [i["uid"] for i in sop_items(answer, "00081199")] == [str(study[0].SOPInstanceUID)]
        # the token still works, with an unlisted certificate or none
        assert post(port, multipart([encoded(study[1])]), token=token, tls=_client(pki, *pki.unlisted))[0] == 200
        assert post(port, multipart([encoded(study[2])]), token=token, tls=_client(pki))[0] == 200
        inst, _ = node.db.counts()
        assert sum(inst.values()) == 3
        # the console takes a browser without a certificate as before
        browser = Browserless(node.web.url, context=_client(pki))
        assert browser.get("/health/live")[0] == 200
        browser.login_with_token(_token(node))
        assert browser.get("/")[0] == 200


def test_a_certificate_subject_posts_only_to_the_routes_that_list_it(tmp_path, tiny_model_path, pki):
    from dicom_node.web.auth import hash_password

    subject = _rfc2253(pki.listed[0])
    web = {"tls": {"cert": str(pki.server_cert), "key": str(pki.server_key)},
           "stow_rs": {"tokens": {"gateway-a": hash_password("gateway-a-token")}, "client_ca": str(pki.ca)}}
    study = make_study(2)
    with Receiver("PACS") as pacs, routed_node(tmp_path, tiny_model_path, pacs.port, web,
                                               {CALLED: [subject], OTHER: ["gateway-a"]}) as node:
        port = node.web.address[1]
        status, _, answer = post(port, multipart([encoded(study[0])]), called=OTHER, token=None,
                                 tls=_client(pki, *pki.listed))
        assert status == 403 and b"stow_rs_clients" in answer, answer
        assert post(port, multipart([encoded(study[0])]), token=None, tls=_client(pki, *pki.unlisted))[0] == 403
        assert post(port, multipart([encoded(study[0])]), token="gateway-a-token", tls=_client(pki))[0] == 403
        _stored_nothing(node)
        assert post(port, multipart([encoded(study[0])]), token=None, tls=_client(pki, *pki.listed))[0] == 200
        assert post(port, multipart([encoded(study[1])]), called=OTHER, token="gateway-a-token",
                    tls=_client(pki))[0] == 200


def test_client_ca_alone_takes_any_certificate_it_signed_and_no_token(tmp_path, tiny_model_path, pki):
    web = {"tls": {"cert": str(pki.server_cert), "key": str(pki.server_key)}, "stow_rs": {"client_ca": str(pki.ca)}}
    study = make_study(1)
    with Receiver("PACS") as pacs, _node(tmp_path, tiny_model_path, pacs.port, None, web=web) as node:
        port = node.web.address[1]
        assert post(port, multipart([encoded(study[0])]), token="any-token", tls=_client(pki))[0] == 401
        _stored_nothing(node)
        assert post(port, multipart([encoded(study[0])]), token=None, tls=_client(pki, *pki.unlisted))[0] == 200


def test_plain_http_has_no_tls_scope_and_no_client_certificate(tmp_path, tiny_model_path):
    """Over plain HTTP a forged ASGI scope cannot be sent; the request only has its headers:
    a header naming a certificate subject is nothing (401)."""
    from dicom_node.web.auth import hash_password

    web = {"stow_rs": {"tokens": [hash_password("t0ken-for-http")]}}
    with Receiver("PACS") as pacs, _node(tmp_path, tiny_model_path, pacs.port, None, web=web) as node:
        conn = http.client.HTTPConnection("127.0.0.1", node.web.address[1], timeout=30)
        conn.request("POST", f"/dicomweb/{CALLED}/studies", body=multipart([encoded(make_study(1)[0])]),
                     headers={"Content-Type": 'multipart/related; type="application/dicom"; '
                                              'boundary=dicom-node-test-boundary',
                              "X-SSL-Client-S-DN": "CN=client", "X-Client-Cert": "CN=client"})
        assert conn.getresponse().status == 401
        conn.close()


def test_client_certificate_config_keys(tmp_path, tiny_model_path, pki):
    def config(web: dict) -> dict:
        return node_config(tmp_path, port=free_port(), model_path=tiny_model_path,
                           destinations={"outbox": {"type": "folder", "path": str(tmp_path / "outbox")}},
                           routes=[{"called_ae": CALLED, "model": "tiny", "destinations": ["outbox"]}],
                           web={"port": 0, **web})

    tls = {"cert": str(pki.server_cert), "key": str(pki.server_key)}
    cfg = parse_config(config({"tls": tls, "stow_rs": {"client_ca": "pki/ca.pem", "subjects": "CN=client"}}),
                       base_dir=tmp_path)
    assert (cfg.web.stow_rs_tokens, cfg.web.stow_rs_client_ca, cfg.web.stow_rs_subjects) == ([], pki.ca, ["CN=client"])
    for web, where in (({"stow_rs": {"client_ca": str(pki.ca)}}, "web.stow_rs.client_ca: needs web.tls"),
                       ({"tls": tls, "stow_rs": {"client_ca": str(tmp_path / "none.pem")}},
                        "web.stow_rs.client_ca: file not found"),
                       ({"tls": tls, "stow_rs": {"client_ca": str(pki.server_key)}}, "web.stow_rs.client_ca: cannot load"),
                       ({"tls": {**tls, "ca": str(pki.ca)}, "stow_rs": {"client_ca": str(pki.ca)}},
                        "web.tls.ca: the CA of STOW-RS client certificates is web.stow_rs.client_ca"),
                       ({"tls": tls, "stow_rs": {"client_ca": str(pki.ca), "subjects": ["client"]}},
                        "web.stow_rs.subjects[0]: must be a certificate subject"),
                       ({"tls": tls, "stow_rs": {"client_ca": str(pki.ca), "subjects": []}},
                        "web.stow_rs.subjects: at least one subject"),
                       ({"tls": tls, "stow_rs": {"subjects": ["CN=client"], "tokens": ["$argon2id$x"]}},
                        "web.stow_rs.subjects: needs web.stow_rs.client_ca"),
                       ({"tls": tls, "stow_rs": {}}, "web.stow_rs.tokens: required key missing")):
        with pytest.raises(ConfigError) as err:
            parse_config(config(web), base_dir=tmp_path)
        assert where in str(err.value), str(err.value)

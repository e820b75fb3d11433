"""Per-route STOW-RS clients (a route's ``stow_rs_clients``; ``web.stow_rs.tokens`` as NAME: hash),
real HTTP to a node running in this process, with the helpers of :mod:`tests.test_stow_rs`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dicom_node.config import ConfigError, parse_config
from dicom_node.node import Node
from dicom_node.web.auth import hash_password
from tests.nodeproc import Receiver, free_port, node_config
from tests.test_stow_rs import CALLED, TOKEN, _stored_nothing, encoded, make_study, multipart, post

TOKEN_B = "stow-test-token-of-gateway-b"
OTHER = "OTHER_STYLE"  # route Y: lists gateway-b only
OPEN = "OPEN_STYLE"  # no stow_rs_clients: every authenticated client


def routed_config(tmp_path: Path, model: Path, destinations: dict, web: dict, clients: dict[str, list[str]]) -> dict:
    """A node config with one route per called AE of ``clients`` (its stow_rs_clients, [] for none)."""
    routes = [{"called_ae": ae, "model": "tiny", "destinations": list(destinations),
               **({"stow_rs_clients": listed} if listed else {})} for ae, listed in clients.items()]
    return node_config(tmp_path, port=free_port(), model_path=model, destinations=destinations, routes=routes,
                       stable=0.2, web={"port": 0, **web})


def routed_node(tmp_path: Path, model: Path, pacs_port: int, web: dict, clients: dict[str, list[str]]) -> Node:
    pacs = {"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}}
    return Node(parse_config(routed_config(tmp_path, model, pacs, web, clients), base_dir=tmp_path))


@pytest.fixture(scope="module")
def named_tokens() -> dict[str, str]:
    return {"gateway-a": hash_password(TOKEN), "gateway-b": hash_password(TOKEN_B)}


def test_a_named_token_posts_only_to_the_routes_that_list_it(tmp_path, tiny_model_path, named_tokens, caplog):
    study = make_study(4)
    web = {"stow_rs": {"tokens": named_tokens}}
    clients = {CALLED: ["gateway-a"], OTHER: ["gateway-b"], OPEN: []}
    caplog.set_level(logging.INFO, logger="dicom_node.web.stow")
    with Receiver("PACS") as pacs, routed_node(tmp_path, tiny_model_path, pacs.port, web, clients) as node:
        port = node.web.address[1]
        status, _, answer = post(port, multipart([encoded(study[0])]), called=OTHER, token=TOKEN)
        assert status == 403 and b"stow_rs_clients" in answer and b"other_style-tiny" in answer, answer
        assert post(port, multipart([encoded(study[0])]), called=CALLED, token=TOKEN_B)[0] == 403
        _stored_nothing(node)
        assert "gateway-a is not in route" in caplog.text
        assert post(port, multipart([encoded(study[0])]), called=CALLED, token=TOKEN)[0] == 200
        assert post(port, multipart([encoded(study[1])]), called=OTHER, token=TOKEN_B)[0] == 200
        assert post(port, multipart([encoded(study[2])]), called=OPEN, token=TOKEN)[0] == 200
        assert post(port, multipart([encoded(study[3])]), called=OPEN, token="wrong-token")[0] == 401
        inst, _ = node.db.counts()
        assert sum(inst.values()) == 3
    assert f"STOW-RS to {CALLED}: 1 instance(s) stored, 0 failed (client gateway-a)" in caplog.text
    assert f"STOW-RS to {OTHER}: 1 instance(s) stored, 0 failed (client gateway-b)" in caplog.text


def test_stow_rs_clients_config_keys(tmp_path, tiny_model_path, named_tokens):
    outbox = {"outbox": {"type": "folder", "path": str(tmp_path / "outbox")}}

    def parse(stow_rs: dict, clients: list, tls: bool = False):
        from tests.certs import make_pki

        web: dict = {"stow_rs": stow_rs}
        if tls:
            pki = make_pki(tmp_path / "pki")
            web["tls"] = {"cert": str(pki.server_cert), "key": str(pki.server_key)}
            web["stow_rs"] = {**stow_rs, "client_ca": str(pki.ca)}
        raw = routed_config(tmp_path, tiny_model_path, outbox, web, {CALLED: clients, OPEN: []})
        return parse_config(raw, base_dir=tmp_path)

    cfg = parse({"tokens": named_tokens}, ["gateway-b"])
    assert cfg.web.stow_rs_token_names == named_tokens
    assert sorted(cfg.web.stow_rs_tokens) == sorted(named_tokens.values())
    assert [r.stow_rs_clients for r in cfg.routes] == [["gateway-b"], None]
    listed = parse({"tokens": list(named_tokens.values())}, [])  # a list of hashes: as before, anonymous
    assert (listed.web.stow_rs_tokens, listed.web.stow_rs_token_names) == (list(named_tokens.values()), {})
    assert parse({"tokens": named_tokens}, ["CN=gw,O=Hospital"], tls=True).routes[0].stow_rs_clients == [
        "CN=gw,O=Hospital"]  # client_ca without subjects: any subject it signs
    unknown = "routes[0].stow_rs_clients[0]: unknown STOW-RS client"
    for stow_rs, clients, tls, where in (
            ({"tokens": named_tokens}, ["gateway-c"], False, unknown),
            ({"tokens": list(named_tokens.values())}, ["gateway-a"], False, unknown),
            ({"tokens": named_tokens}, ["CN=gw"], False, unknown),  # no client_ca
            ({"tokens": named_tokens, "subjects": ["CN=other"]}, ["CN=gw"], True, unknown),
            ({"tokens": named_tokens}, [], False, None),
            ({"tokens": {"gateway-a": "plain-text-token"}}, [], False, "web.stow_rs.tokens.gateway-a: must be an "
                                                                        "Argon2 hash"),
            ({"tokens": {"CN=x": named_tokens["gateway-a"]}}, [], False, "must be NAME: ARGON2-HASH")):
        raw = routed_config(tmp_path, tiny_model_path, outbox, {"stow_rs": stow_rs}, {CALLED: clients, OPEN: []})
        if tls:
            with pytest.raises(ConfigError) as err:
                parse(stow_rs, clients, tls=True)
        else:
            if where is None:
                raw["routes"][0]["stow_rs_clients"] = []
                where = "routes[0].stow_rs_clients: at least one client"
            with pytest.raises(ConfigError) as err:
                parse_config(raw, base_dir=tmp_path)
        assert where in str(err.value), str(err.value)
        assert "plain-text-token" not in str(err.value)

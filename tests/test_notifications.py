"""Webhook notifications against real local HTTP receivers, one of them down at first.

The node is a real ``dicom-node serve`` process, studies arrive over real associations, and
the node is killed with -9 while notifications wait for a receiver that is down: after the
restart every one arrives, signed, once, without patient data unless the webhook asks for it.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dicom_node.notifications import SIGNATURE_HEADER
from tests.factory import PATIENT_ID, PATIENT_NAME
from tests.nodeproc import NodeProcess, Receiver, free_port, node_config, send, wait_for, write_config
from tests.test_node import study

SECRET = "webhook-shared-secret"


class HookReceiver:
    """A real HTTP server on 127.0.0.1 recording every POST (headers and JSON body) and when."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.posts: list[tuple[dict, bytes]] = []
        self.times: list[float] = []
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> "HookReceiver":
        posts, times = self.posts, self.times

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                times.append(time.time())
                posts.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def events(self) -> list[dict]:
        return [json.loads(body) for _, body in self.posts]


@pytest.fixture
def untrained_path(tmp_path) -> Path:
    from dicom_node.engine import new_style_model, save_style_model

    path = tmp_path / "untrained.safetensors"  # noise out: the fidelity guard flags it
    save_style_model(new_style_model(ngf=4, n_blocks=1, residual=False, seed=4), path, name="untrained")
    return path


def test_webhooks_survive_a_receiver_down_and_a_kill_9(tmp_path, tiny_model_path, untrained_path):
    ops_port, ris = free_port(), HookReceiver(free_port()).start()
    ops = HookReceiver(ops_port)  # down at first
    with Receiver("PACS") as pacs:
        port = free_port()
        dests = {"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port},
                 "gone": {"type": "dicom", "ae_title": "GONE", "host": "127.0.0.1", "port": free_port()}}
        cfg = node_config(tmp_path, port=port, model_path=tiny_model_path, destinations=dests, stable=0.3,
                          routes=[{"called_ae": "DR_KIM", "model": "tiny", "destinations": ["pacs"]},
                                  {"called_ae": "DR_BAD", "model": "bad", "destinations": ["pacs"],
                                   "fidelity": {"action": "withhold"}},
                                  {"called_ae": "DR_LOST", "model": "tiny", "destinations": ["gone"]}],
                          retry={"max_attempts": 2, "backoff_seconds": [0.2]})
        cfg["models"]["bad"] = {"path": str(untrained_path), "device": "cpu"}
        cfg["notifications"] = [
            {"name": "ops", "url": f"http://127.0.0.1:{ops_port}/hook", "secret": SECRET,
             "retry": {"max_attempts": 200, "backoff_seconds": [0.3]}},
            {"name": "ris", "url": f"http://127.0.0.1:{ris.port}/ris", "events": ["study.delivered"],
             "include_phi": True}]
        cfg_path = write_config(tmp_path / "node.yaml", cfg)
        node = NodeProcess(cfg_path, port, tmp_path / "node.log").start()
        try:
            kim = study(2)
            assert send(port, kim, called="DR_KIM") == [0, 0]
            assert send(port, study(1), called="DR_BAD") == [0]
            assert send(port, study(1), called="DR_LOST") == [0]
            assert wait_for(lambda: len(ris.posts) == 1, 60), node.log()[-2000:]
            delivered = ris.events()[0]
            assert delivered["event"] == "study.delivered" and delivered["study_uid"] == str(kim[0].StudyInstanceUID)
            assert delivered["instances"] == 2 and delivered["destinations"] == ["pacs"]
            assert delivered["patient_name"] == PATIENT_NAME and delivered["patient_id"] == PATIENT_ID  # include_phi
            assert wait_for(lambda: node.log().count("webhook ops:") >= 6, 60)  # ops is down: retrying
            node.kill9()  # with three events still waiting for ops
            ops.start()
            node.start()
            assert wait_for(lambda: len(ops.posts) == 3, 60), node.log()[-2000:]
        finally:
            node.kill9()
            ops.stop()
            ris.stop()
    events = {e["event"]: e for e in ops.events()}
    assert set(events) == {"study.delivered", "output.withheld", "delivery.failed"}
    assert events["delivery.failed"]["destination"] == "gone" and events["delivery.failed"]["attempts"] == 2
    assert events["output.withheld"]["reasons"] and events["output.withheld"]["route"] == "dr_bad-bad"
    ids = [headers["x-dicom-node-delivery"] for headers, _ in ops.posts]
    assert len(set(ids)) == 3  # each once
    for headers, body in ops.posts:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers[SIGNATURE_HEADER.lower()] == expected
        assert PATIENT_NAME.encode() not in body and PATIENT_ID.encode() not in body  # no include_phi
    log = (tmp_path / "node.log").read_text()
    assert PATIENT_NAME not in log and PATIENT_ID not in log


def test_https_webhook_is_verified_against_its_ca(tmp_path, tiny_model_path):
    """A receiver over https: trusted through tls.ca it gets the event; one whose certificate
    the node cannot verify gets nothing, and the failure says why."""
    import ssl

    from dicom_node.config import parse_config
    from dicom_node.node import Node
    from tests.certs import make_pki

    pki = make_pki(tmp_path / "pki")
    hook = HookReceiver(free_port()).start()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    hook._server.socket = server_ctx.wrap_socket(hook._server.socket, server_side=True)
    url = f"https://127.0.0.1:{hook.port}/hook"
    try:
        cfg = node_config(tmp_path, port=free_port(), model_path=tiny_model_path, stable=0.2,
                          destinations={"out": {"type": "folder", "path": str(tmp_path / "out")}},
                          routes=[{"called_ae": "DR_KIM", "model": "tiny", "destinations": ["out"]}])
        cfg["notifications"] = [
            {"name": "trusted", "url": url, "events": ["study.delivered"], "tls": {"ca": str(pki.ca)}},
            {"name": "untrusted", "url": url, "events": ["study.delivered"], "tls": {"ca": str(pki.rogue_ca)},
             "retry": {"max_attempts": 1}}]
        with Node(parse_config(cfg, base_dir=tmp_path)) as node:
            assert send(node.port, study(1), called="DR_KIM") == [0]
            assert wait_for(lambda: len(hook.posts) == 1 and node.db.outbox.recent(state="failed"), 60)
            failed = node.db.outbox.recent(state="failed")
            assert [n["webhook"] for n in failed] == ["untrusted"] and "CERTIFICATE_VERIFY_FAILED" in \
                failed[0]["last_error"]
            assert [n["webhook"] for n in node.db.outbox.recent(state="sent")] == ["trusted"]
    finally:
        hook.stop()


# ----------------------------------------------------------------------------- hostile receivers (issue 24)


class BadReceiver:
    """A real TCP server on 127.0.0.1 that reads a request and then answers ``answer``: all at
    once, or one byte every ``trickle`` seconds (it never finishes an answer of 10 kB)."""

    def __init__(self, answer: bytes, trickle: float | None = None) -> None:
        self.answer, self.trickle = answer, trickle
        self.connections: list[float] = []
        self._stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._sock.settimeout(0.2)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            self.connections.append(time.time())
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                if self.trickle is None:
                    conn.sendall(self.answer)
                    return
                for byte in self.answer:
                    if self._stop.wait(self.trickle):
                        return
                    conn.sendall(bytes([byte]))
            except OSError:
                pass

    def stop(self) -> None:
        self._stop.set()
        self._sock.close()


def _hook_node(tmp_path, tiny_model_path, hooks: list[dict], **extra):
    from dicom_node.config import parse_config
    from dicom_node.node import Node

    cfg = node_config(tmp_path, port=free_port(), model_path=tiny_model_path, stable=0.2,
                      destinations={"out": {"type": "folder", "path": str(tmp_path / "out")}},
                      routes=[{"called_ae": "DR_KIM", "model": "tiny", "destinations": ["out"]}], **extra)
    cfg["notifications"] = hooks
    return Node(parse_config(cfg, base_dir=tmp_path))


def _row(node, webhook: str) -> dict | None:
    rows = [n for n in node.db.outbox.recent() if n["webhook"] == webhook]
    return rows[0] if rows else None


def test_a_trickling_receiver_delays_only_itself(tmp_path, tiny_model_path):
    """A receiver answering two bytes a second is cut at the webhook's timeout (a deadline for
    the whole request, not per read), and the other webhook gets each event at once."""
    slow = BadReceiver(b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"a" * 10_000, trickle=0.5)
    good = HookReceiver(free_port()).start()
    retry = {"max_attempts": 100, "backoff_seconds": [0.2]}
    hooks = [{"name": "slow", "url": f"http://127.0.0.1:{slow.port}/hook", "timeout": 2, "retry": retry},
             {"name": "good", "url": f"http://127.0.0.1:{good.port}/hook", "timeout": 2}]
    try:
        with _hook_node(tmp_path, tiny_model_path, hooks) as node:
            for n in (1, 2):  # the second study while the slow receiver is being retried
                assert send(node.port, study(1), called="DR_KIM") == [0]
                assert wait_for(lambda: len(good.times) == n, 30)
                created = max(r["created_at"] for r in node.db.outbox.recent() if r["webhook"] == "good")
                assert good.times[-1] - created < 1.5, good.times[-1] - created  # not behind the slow one (2 s)
            assert wait_for(lambda: (_row(node, "slow") or {}).get("attempts", 0) >= 2, 30), _row(node, "slow")
            first = node.db.database.query("SELECT created_at FROM notifications WHERE webhook='slow' "
                                           "ORDER BY id")[0][0]
            assert slow.connections[1] - first < 2 * 2 + 2, slow.connections  # two attempts, each cut at 2 s
            assert "no complete answer within 2 s" in _row(node, "slow")["last_error"]
    finally:
        slow.stop()
        good.stop()


def test_a_receiver_that_is_not_http_is_a_failed_attempt(tmp_path, tiny_model_path):
    """An answer that is not HTTP (BadStatusLine) is a failed attempt with backoff: its lease is
    released, it is tried again, and the other webhook goes on - also after a restart."""
    garbage = BadReceiver(b"SSH-2.0-OpenSSH_9.6 not http at all\r\n\r\n")
    good = HookReceiver(free_port()).start()
    hooks = [{"name": "garbage", "url": f"http://127.0.0.1:{garbage.port}/hook",
              "retry": {"max_attempts": 100, "backoff_seconds": [0.3]}},
             {"name": "good", "url": f"http://127.0.0.1:{good.port}/hook"}]
    try:
        for start in (1, 2):
            with _hook_node(tmp_path, tiny_model_path, hooks) as node:
                assert send(node.port, study(1), called="DR_KIM") == [0]
                assert wait_for(lambda: len(good.posts) == start, 30), node.db.outbox.recent()
                before = len(garbage.connections)
                assert wait_for(lambda: len(garbage.connections) >= before + 2, 30)  # retried: lease released
                # The connections above may all be the earlier run's event; the newest row (this
                # study's) must have been tried itself before its error can be read.
                assert wait_for(lambda: "BadStatusLine" in ((_row(node, "garbage") or {}).get("last_error") or ""),
                                30), _row(node, "garbage")
                row = _row(node, "garbage")
                assert row["state"] == "pending" and "BadStatusLine" in row["last_error"], row
                database = node.spool.database(node.config.storage.database)
        import sqlite3

        with sqlite3.connect(database) as db:
            held = db.execute("SELECT COUNT(*) FROM notifications WHERE lease_owner IS NOT NULL").fetchone()[0]
        assert held == 0  # a stop gives back whatever was claimed
    finally:
        garbage.stop()
        good.stop()


def test_webhook_secrets_never_reach_logs_database_or_console(tmp_path, tiny_model_path, caplog):
    """The signing secret, header values and a token in a receiver's path appear in no log
    line, in no byte of the state database and on no console page, while receivers fail."""
    import logging
    import urllib.request

    from dicom_node.node import CONSOLE_TOKEN_FILE

    caplog.set_level(logging.DEBUG)
    secrets = ["sign-pw-4f1c", "bearer-pw-8d2e", "path-token-77aa"]
    got = HookReceiver(free_port()).start()
    garbage = BadReceiver(b"nonsense\r\n\r\n")
    retry = {"max_attempts": 2, "backoff_seconds": [0.1]}
    hooks = [{"name": "refused", "url": f"http://127.0.0.1:{free_port()}/hooks/{secrets[2]}", "secret": secrets[0],
              "headers": {"Authorization": f"Bearer {secrets[1]}"}, "retry": retry},
             {"name": "garbage", "url": f"http://127.0.0.1:{garbage.port}/x?token={secrets[2]}",
              "secret": secrets[0], "retry": retry},
             {"name": "got", "url": f"http://127.0.0.1:{got.port}/in", "secret": secrets[0],
              "headers": {"Authorization": f"Bearer {secrets[1]}"}}]
    try:
        with _hook_node(tmp_path, tiny_model_path, hooks, web={"port": 0}) as node:
            assert send(node.port, study(1), called="DR_KIM") == [0]
            assert wait_for(lambda: len(node.db.outbox.recent(state="failed")) == 2 and got.posts, 60), \
                node.db.outbox.recent()
            assert got.posts[0][0]["authorization"] == f"Bearer {secrets[1]}"  # the header does its job
            token = (node.spool.node_dir / CONSOLE_TOKEN_FILE).read_text().strip()
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                                 urllib.request.HTTPCookieProcessor())
            opener.open(f"{node.web.url}/login?token={token}", timeout=15).read()
            pages = "".join(opener.open(node.web.url + p, timeout=15).read().decode()
                            for p in ("/", "/failures", "/studies", "/actions"))
            assert "ConnectionRefusedError" in pages and "BadStatusLine" in pages  # the errors are shown
            database = node.spool.database(node.config.storage.database)
        stored = b"".join(Path(f).read_bytes() for f in (str(database), f"{database}-wal") if Path(f).exists())
    finally:
        got.stop()
        garbage.stop()
    for secret in secrets:
        assert secret not in caplog.text and secret not in pages and secret.encode() not in stored, secret


def test_a_webhook_removed_by_a_reload_stops_and_its_events_are_given_up(tmp_path, tiny_model_path):
    """Per-webhook senders follow a reload: a removed webhook's waiting events are kept as failed
    ("no longer configured") when they come due, an added one gets its events."""
    import yaml

    from dicom_node.config import load_config
    from dicom_node.node import Node

    added = HookReceiver(free_port()).start()
    cfg = node_config(tmp_path, port=free_port(), model_path=tiny_model_path, stable=0.2,
                      destinations={"out": {"type": "folder", "path": str(tmp_path / "out")}},
                      routes=[{"called_ae": "DR_KIM", "model": "tiny", "destinations": ["out"]}])
    cfg["notifications"] = [{"name": "gone", "url": f"http://127.0.0.1:{free_port()}/x",
                             "retry": {"max_attempts": 100, "backoff_seconds": [2]}}]
    path = write_config(tmp_path / "node.yaml", cfg)
    try:
        with Node(load_config(path), config_path=str(path)) as node:
            assert send(node.port, study(1), called="DR_KIM") == [0]
            assert wait_for(lambda: (_row(node, "gone") or {}).get("attempts") == 1, 30)
            cfg["notifications"] = [{"name": "added", "url": f"http://127.0.0.1:{added.port}/in"}]
            path.write_text(yaml.safe_dump(cfg))
            assert node.reload()["changes"] == ["webhook added added", "webhook gone removed"]
            assert wait_for(lambda: _row(node, "gone")["state"] == "failed", 10), _row(node, "gone")
            assert _row(node, "gone")["last_error"] == "webhook no longer configured"
            assert send(node.port, study(1), called="DR_KIM") == [0]
            assert wait_for(lambda: len(added.posts) == 1, 30)
    finally:
        added.stop()

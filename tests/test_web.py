"""The console's HTTP side against a running node: metrics, health, login, CSRF, TLS.

Real parts only: the node runs in this process with its console on a kernel-chosen
loopback port, studies arrive over real associations, the PACS is a pynetdicom storage SCP,
and the HTTP requests go over TCP (urllib).  The browser walk-through is test_console_browser.
"""
from __future__ import annotations

import http.cookiejar
import json
import logging
import re
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dicom_node.config import ConfigError, parse_config
from dicom_node.node import CONSOLE_TOKEN_FILE, Node
from dicom_node.web.auth import MAX_FAILURES, hash_password
from tests.factory import PATIENT_ID, PATIENT_NAME
from tests.nodeproc import Receiver, free_port, node_config, send, wait_for
from tests.postgres import both_backends, postgres_server  # noqa: F401 - fixtures
from tests.test_node import study

pytestmark = pytest.mark.usefixtures("both_backends")  # the console on either state database


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # let the test see the 303 itself
        return None


class Browserless:
    """Cookies, no redirects, no proxies: what the test needs of an HTTP client."""

    def __init__(self, base: str, context: ssl.SSLContext | None = None) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        handlers = [urllib.request.ProxyHandler({}), urllib.request.HTTPCookieProcessor(self.jar), NoRedirect()]
        if context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self.opener = urllib.request.build_opener(*handlers)

    def request(self, path: str, data: dict | None = None, accept: str = "text/html") -> tuple[int, dict, str]:
        body = None if data is None else urllib.parse.urlencode(data).encode()
        req = urllib.request.Request(self.base + path, data=body, headers={"Accept": accept})
        try:
            with self.opener.open(req, timeout=15) as r:
                return r.status, dict(r.headers), r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read().decode(errors="replace")

    def get(self, path: str, **kw) -> tuple[int, dict, str]:
        return self.request(path, **kw)

    def post(self, path: str, data: dict) -> tuple[int, dict, str]:
        return self.request(path, data)

    def csrf(self, path: str = "/") -> str:
        status, _, html = self.get(path)
        assert status == 200, (status, html[:300])
        return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)

    def login_with_token(self, token: str) -> None:
        status, headers, _ = self.get(f"/login?token={token}")
        assert status == 303, status
        cookie = headers.get("set-cookie", "")
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie, cookie


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _node(tmp_path: Path, model: Path, pacs_port: int, **extra) -> Node:
    extra.setdefault("web", {"port": 0})
    raw = node_config(tmp_path, port=free_port(), model_path=model,
                      destinations={"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                                             "port": pacs_port},
                                    "outbox": {"type": "folder", "path": str(tmp_path / "outbox")}},
                      routes=[{"called_ae": "DR_KIM_STYLE", "model": "tiny", "destinations": ["pacs", "outbox"]}],
                      stable=0.2, **extra)
    return Node(parse_config(raw, base_dir=tmp_path))


def _token(node: Node) -> str:
    return (node.spool.node_dir / CONSOLE_TOKEN_FILE).read_text().strip()


def test_metrics_equal_the_state_database_and_survive_a_restart(tmp_path, tiny_model_path):
    """After a known run (one PACS down, then back; one rejected association) every counter is
    what the state database says, the histograms counted every answer, and a restart keeps
    the counters."""
    pacs = Receiver("PACS", port=free_port())  # not started yet: deliveries to it fail
    node = _node(tmp_path, tiny_model_path, pacs.port, retry={"max_attempts": 2, "backoff_seconds": [0.2]})
    sources = study(3)
    with node:
        web = Browserless(node.web.url)
        assert send(node.port, sources, called="DR_KIM_STYLE") == [0, 0, 0]
        assert send(node.port, sources[:1], called="DR_KIM_STYLE") == [0]  # a duplicate: not counted
        with pytest.raises(ConnectionError):
            send(node.port, sources[:1], called="NOBODY")  # rejected
        assert wait_for(lambda: node.db.counts()[1]["failed"] == 3, 60), node.db.counts()
        _, _, text = web.get("/metrics", accept="text/plain")
        m = metric_samples(text)
        db = node.db
        assert m[("dicom_node_instances_received_total", (("called_ae", "DR_KIM_STYLE"), ("protocol", "dimse")))] == 3
        assert m[("dicom_node_instances_translated_total", (("model", "tiny"),))] == len(db.audit.rows()) == 3
        assert m[("dicom_node_deliveries_total", (("destination", "outbox"), ("outcome", "delivered")))] == 3
        failed_rows = db.database.query("SELECT attempts FROM deliveries WHERE destination='pacs' AND state='failed'")
        assert m[("dicom_node_deliveries_total", (("destination", "pacs"), ("outcome", "failed")))] == len(failed_rows)
        assert m[("dicom_node_deliveries_total", (("destination", "pacs"), ("outcome", "retry")))] == \
            sum(a - 1 for (a,) in failed_rows)
        instances, deliveries = db.counts()
        for state, n in instances.items():
            assert m[("dicom_node_queue_items", (("state", state),))] == n
        assert m[("dicom_node_destination_backlog", (("destination", "pacs"),))] == 0
        assert m[("dicom_node_cstore_response_seconds_count", ())] == 4
        assert m[("dicom_node_translation_seconds_count", (("model", "tiny"),))] == 3
        assert m[("dicom_node_spool_free_bytes", ())] > 0
        assert wait_for(lambda: len(db.operations.associations()) == 3, 10)
        outcomes = sorted(a["outcome"] for a in db.operations.associations())
        assert outcomes == ["rejected", "released", "released"]
        _, _, text = web.get("/metrics", accept="text/plain")
        m = metric_samples(text)
        assert m[("dicom_node_associations_total", (("outcome", "released"),))] == 2
        assert m[("dicom_node_associations_total", (("outcome", "rejected"),))] == 1
        assert m[("dicom_node_fidelity_flagged_total", (("model", "tiny"),))] == \
            sum(r["verdict"] == "flagged" for r in db.audit.rows())
        assert PATIENT_NAME not in text and PATIENT_ID not in text
        # the PACS comes back; the operator requeues from the console
        pacs.start()
        web.login_with_token(_token(node))
        status, _, _ = web.post("/requeue", {"csrf_token": web.csrf("/failures"), "back": "/failures"})
        assert status == 303
        assert wait_for(lambda: len(pacs.uids()) == 3, 30), pacs.uids()
        assert wait_for(lambda: db.counts()[0]["delivered"] == 3, 10)
        m = metric_samples(web.get("/metrics", accept="text/plain")[2])
        assert m[("dicom_node_deliveries_total", (("destination", "pacs"), ("outcome", "delivered")))] == 3
        before = {k: v for k, v in m.items() if k[0].endswith("_total")}
    pacs.stop()
    restarted = _node(tmp_path, tiny_model_path, pacs.port)
    with restarted:
        m = metric_samples(Browserless(restarted.web.url).get("/metrics", accept="text/plain")[2])
        assert {k: v for k, v in m.items() if k[0].endswith("_total") and k in before} == before
        assert m[("dicom_node_cstore_response_seconds_count", ())] == 0  # timings start afresh


def test_ready_turns_503_below_the_spool_watermark(tmp_path, tiny_model_path):
    with Receiver("PACS") as pacs, _node(tmp_path, tiny_model_path, pacs.port) as node:
        web = Browserless(node.web.url)
        assert web.get("/health/live", accept="application/json")[0] == 200
        assert wait_for(lambda: web.get("/health/ready", accept="application/json")[0] == 200, 30)
        node.config.storage.min_free_bytes = node.spool.free_bytes() + 10**15  # a full disk, as far as we know
        status, _, body = web.get("/health/ready", accept="application/json")
        report = json.loads(body)
        assert status == 503 and report["failing"] == ["spool"], report
        assert report["checks"]["spool"]["ok"] is False and report["checks"]["listener"]["ok"] is True
        assert send(node.port, study(1), called="DR_KIM_STYLE") == [0xA700]  # and the listener refuses
        node.config.storage.min_free_bytes = 0
        assert web.get("/health/ready", accept="application/json")[0] == 200


def test_console_needs_a_login_and_a_csrf_token(tmp_path, tiny_model_path, caplog):
    caplog.set_level(logging.DEBUG)
    with Receiver("PACS") as pacs, _node(tmp_path, tiny_model_path, pacs.port) as node:
        sources = study(1)
        assert send(node.port, sources, called="DR_KIM_STYLE") == [0]
        assert wait_for(lambda: len(pacs.uids()) == 1, 30)
        web = Browserless(node.web.url)
        study_page = f"/studies/{sources[0].StudyInstanceUID}"
        for path in ("/", "/studies", study_page, "/failures", "/actions", "/previews/1.png"):
            status, headers, body = web.get(path)
            assert status == 303 and headers["location"].startswith("/login?next="), (path, status)
            assert PATIENT_NAME not in body and PATIENT_ID not in body
            status, _, body = web.get(path, accept="application/json")
            assert status == 401 and PATIENT_NAME not in body
        assert web.post("/requeue", {"csrf_token": "x"})[0] == 401
        assert web.get("/login?token=wrong")[0] == 401
        web.login_with_token(_token(node))
        status, headers, html = web.get("/studies")
        assert status == 200 and "SECRET, PATIENT" in html and PATIENT_ID in html  # PATIENT_NAME as people read it
        assert "frame-ancestors 'none'" in headers["content-security-policy"] and headers["cache-control"] == "no-store"
        status, _, html = web.get("/")
        nodes = html[html.index('<table id="nodes">'):]
        assert f"{node.name} (this one)" in nodes and "<td>all</td>" in nodes and "<td>up</td>" in nodes
        status, _, html = web.get(study_page)
        assert status == 200 and "/previews/" in html and "delivered" in html
        preview = re.search(r'src="(/previews/\d+\.png)"', html).group(1)
        status, headers, _ = web.get(preview, accept="image/png")
        assert status == 200 and headers["content-type"] == "image/png"
        # state-changing requests without the session's CSRF token change nothing
        assert web.post("/requeue", {})[0] == 403
        assert web.post("/discard", {"all": "1", "csrf_token": "forged"})[0] == 403
        assert web.post("/requeue", {"csrf_token": web.csrf()})[0] == 303
        actions = node.db.operations.actions()
        assert [a["action"] for a in actions][:2] == ["requeue", "login"] and actions[0]["user"] == "token"
        status, _, html = web.get("/actions")
        assert "requeue" in html and "token" in html
    logs = caplog.text
    assert PATIENT_NAME not in logs and PATIENT_ID not in logs


def test_password_login_over_tls_is_rate_limited(tmp_path, tiny_model_path):
    from tests.certs import make_pki

    pki = make_pki(tmp_path / "pki")
    password = "correct horse battery"
    extra = {"web": {"port": 0, "users": {"alice": hash_password(password)},
                     "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key)}}}
    with Receiver("PACS") as pacs, _node(tmp_path, tiny_model_path, pacs.port, **extra) as node:
        assert node.web.url.startswith("https://")
        trust = ssl.create_default_context(cafile=str(pki.ca))
        web = Browserless(node.web.url, trust)
        with pytest.raises(urllib.error.URLError):  # a client that does not trust the certificate
            Browserless(node.web.url, ssl.create_default_context()).get("/health/live")
        assert web.get("/login?token=anything")[0] == 200  # no token login when users exist

        def login(pw: str) -> tuple[int, dict, str]:
            _, _, html = web.get("/login")
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
            return web.post("/login", {"csrf_token": csrf, "user": "alice", "password": pw, "next": "/failures"})

        assert web.post("/login", {"user": "alice", "password": password})[0] == 403  # no login-form token
        status, headers, _ = login(password)
        assert status == 303 and headers["location"] == "/failures"
        cookie = headers["set-cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert web.get("/failures")[0] == 200
        for _ in range(MAX_FAILURES):
            assert login("wrong password")[0] == 401
        assert login(password)[0] == 429  # blocked for a while, even with the right password
        assert [a["action"] for a in node.db.operations.actions()].count("login-failed") == MAX_FAILURES


def test_web_config_keys(tmp_path, tiny_model_path):
    base = node_config(tmp_path, port=11112, model_path=tiny_model_path,
                       destinations={"out": {"type": "folder", "path": str(tmp_path / "out")}},
                       routes=[{"called_ae": "A", "model": "tiny", "destinations": ["out"]}])
    assert parse_config(base, base_dir=tmp_path).web is None  # web: null
    del base["web"]
    web = parse_config(base, base_dir=tmp_path).web
    assert (web.host, web.port, web.users) == ("127.0.0.1", 8080, {})  # absent: the default console
    base["web"] = {"port": 11112, "users": {"bob": "plaintext"}, "tls": "node", "colour": "blue"}
    with pytest.raises(ConfigError) as err:
        parse_config(base, base_dir=tmp_path)
    text = str(err.value)
    for needle in ("web.port: the DICOM listener already uses port 11112", "web.users.bob: must be an Argon2",
                   "web.tls: 'node' reuses node.tls", "colour"):
        assert needle in text, text


def test_console_releases_and_drops_withheld_outputs(tmp_path, tiny_model_path):
    """The console's Release and Drop buttons on outputs the fidelity guard withheld."""
    from dicom_node.engine import new_style_model, save_style_model

    untrained = tmp_path / "untrained.safetensors"  # noise out: the guard flags every output
    save_style_model(new_style_model(ngf=4, n_blocks=1, residual=False, seed=4), untrained, name="untrained")
    with Receiver("PACS") as pacs:
        raw = node_config(tmp_path, port=free_port(), model_path=untrained,
                          destinations={"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1",
                                                 "port": pacs.port}},
                          routes=[{"called_ae": "DR_KIM_STYLE", "model": "tiny", "destinations": ["pacs"],
                                   "fidelity": {"action": "withhold"}}], stable=0.2, web={"port": 0})
        with Node(parse_config(raw, base_dir=tmp_path)) as node:
            first, second = study(1), study(1)
            assert send(node.port, first + second, called="DR_KIM_STYLE") == [0, 0]
            assert wait_for(lambda: len(node.db.audit.withheld()) == 2, 60), node.db.counts()
            web = Browserless(node.web.url)
            web.login_with_token(_token(node))
            status, _, html = web.get("/failures")
            outputs = {w["source_sop_uid"]: w["output_sop_uid"] for w in node.db.audit.withheld()}
            keep, drop = outputs[str(first[0].SOPInstanceUID)], outputs[str(second[0].SOPInstanceUID)]
            assert keep in html and drop in html and "Release" in html
            csrf = web.csrf("/failures")
            status, headers, _ = web.post("/release", {"csrf_token": csrf, "uid": keep, "back": "/failures"})
            assert status == 303 and headers["location"] == "/failures"
            assert "released 1 withheld output" in web.get("/failures")[2]  # once, on the next page
            assert "released 1 withheld output" not in web.get("/failures")[2]
            assert wait_for(lambda: pacs.uids() == [keep], 30), pacs.uids()
            assert web.post("/discard", {"csrf_token": csrf, "uid": drop, "back": "/failures"})[0] == 303
            assert wait_for(lambda: node.db.counts()[0]["discarded"] == 1, 10)
            assert pacs.uids() == [keep]
            done = {r["output_sop_uid"]: r["disposition"] for r in node.db.audit.rows()}
            assert done == {keep: "released", drop: "discarded"}
            actions = [(a["action"], a["user"]) for a in node.db.operations.actions()][:2]
            assert actions == [("discard", "token"), ("release", "token")]


# ----------------------------------------------------------------------------- hardening (issue 24)

WRONG = "wrong password"


class RawLogin:
    """Password logins over real HTTP (http.client, one connection each: threads may share it),
    with an ``X-Forwarded-For`` of the caller's choice."""

    def __init__(self, url: str) -> None:
        self.host, self.port = url.split("//")[1].rsplit(":", 1)
        status, headers, html = Browserless(url).get("/login")
        assert status == 200
        self.csrf = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
        self.cookie = re.search(r"dicom_node_login=([^;]+)", headers["set-cookie"]).group(1)

    def connect(self):
        import http.client

        return http.client.HTTPConnection(self.host, int(self.port), timeout=60)

    def post(self, password: str, forwarded: str | None = None, conn=None) -> int:
        conn = conn or self.connect()
        body = urllib.parse.urlencode({"csrf_token": self.csrf, "user": "alice", "password": password})
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Cookie": f"dicom_node_login={self.cookie}"}
        if forwarded:
            headers["X-Forwarded-For"] = forwarded
        try:
            conn.request("POST", "/login", body, headers)
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    def at_once(self, n: int, password: str, forwarded=lambda i: None) -> list[int]:
        """``n`` logins sent at the same moment from ``n`` threads (connections opened first)."""
        import threading

        conns = [self.connect() for _ in range(n)]
        for c in conns:
            c.connect()
        start, out = threading.Barrier(n), [0] * n

        def one(i: int) -> None:
            start.wait()
            out[i] = self.post(password, forwarded(i), conns[i])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        return out


def _password_node(tmp_path, tiny_model_path, pacs_port, **web):
    return _node(tmp_path, tiny_model_path, pacs_port,
                 web={"port": 0, "users": {"alice": hash_password("right password")}, **web})


def test_forwarded_for_is_believed_only_from_trusted_proxies(tmp_path, tiny_model_path, caplog):
    """Default (no trusted proxy): a new X-Forwarded-For per guess changes nothing, the limit
    holds and the operator log names the real peer.  With the proxy listed, the forwarded
    address is the client (the nearest hop that is not a proxy)."""
    caplog.set_level(logging.INFO, logger="dicom_node.web")
    with Receiver("PACS") as pacs:
        with _password_node(tmp_path / "a", tiny_model_path, pacs.port) as node:
            login = RawLogin(node.web.url)
            statuses = [login.post(WRONG, f"203.0.113.{i}") for i in range(12)]
            assert statuses == [401] * MAX_FAILURES + [429] * (12 - MAX_FAILURES), statuses
            targets = {a["target"] for a in node.db.operations.actions() if a["action"] == "login-failed"}
            assert targets == {"127.0.0.1"}, targets
        assert "203.0.113." not in caplog.text and "from 127.0.0.1" in caplog.text
        caplog.clear()
        with _password_node(tmp_path / "b", tiny_model_path, pacs.port, trusted_proxies=["127.0.0.0/8"]) as node:
            login = RawLogin(node.web.url)
            statuses = [login.post(WRONG, f"198.51.100.1, 203.0.113.{i}") for i in range(12)]
            assert statuses == [401] * 12, statuses  # twelve clients, one guess each
            # the newest twelve (on PostgreSQL both nodes share one database)
            failed = [a for a in node.db.operations.actions() if a["action"] == "login-failed"]
            targets = {a["target"] for a in failed[:12]}
            assert targets == {f"203.0.113.{i}" for i in range(12)}, targets  # never the client-written hop
            assert "from 203.0.113.11" in caplog.text
            assert login.post(WRONG, "garbage") == 401 and login.post(WRONG) == 401  # counted as the proxy's
            assert [a["target"] for a in node.db.operations.actions()][:2] == ["127.0.0.1", "127.0.0.1"]


def test_trusted_proxies_config(tmp_path, tiny_model_path):
    from dicom_node.web.auth import client_address, proxy_networks

    base = node_config(tmp_path, port=11112, model_path=tiny_model_path,
                       destinations={"out": {"type": "folder", "path": str(tmp_path / "out")}},
                       routes=[{"called_ae": "A", "model": "tiny", "destinations": ["out"]}])
    base["web"] = {"port": 0}
    assert parse_config(base, base_dir=tmp_path).web.trusted_proxies == []
    base["web"]["trusted_proxies"] = ["10.1.2.3/8", "::1", "not-an-address"]
    with pytest.raises(ConfigError) as err:
        parse_config(base, base_dir=tmp_path)
    assert "web.trusted_proxies[2]: not an IP address or network" in str(err.value)
    base["web"]["trusted_proxies"] = ["10.1.2.3/8", "::1"]
    trusted = parse_config(base, base_dir=tmp_path).web.trusted_proxies
    assert trusted == ["10.0.0.0/8", "::1/128"]
    nets = proxy_networks(trusted)
    assert client_address("10.0.0.5", "1.1.1.1, 2.2.2.2, 10.9.9.9", nets) == "2.2.2.2"
    assert client_address("192.0.2.1", "1.1.1.1", nets) == "192.0.2.1"  # not a proxy: its header is ignored
    assert client_address("10.0.0.5", "1.1.1.1, junk", nets) == "10.0.0.5"
    assert client_address("10.0.0.5", None, ()) == "10.0.0.5"


def test_concurrent_wrong_logins_stop_at_the_limit(tmp_path, tiny_model_path):
    """30 wrong logins sent at the same moment: at most the limit are checked (401), the rest
    are refused by the limiter (429; 503 for those that waited too long for a hashing turn) -
    the check and the record are one step."""
    with Receiver("PACS") as pacs, _password_node(tmp_path, tiny_model_path, pacs.port) as node:
        statuses = RawLogin(node.web.url).at_once(30, WRONG)
        checked, refused, busy = statuses.count(401), statuses.count(429), statuses.count(503)
        # every other login refused: by the limiter, or (on a loaded machine, where the hashing
        # queue's wait runs out) answered busy before its check; never checked past the limit
        assert 1 <= checked <= MAX_FAILURES and refused > 0 and refused + busy == 30 - checked, sorted(statuses)
        assert [a["action"] for a in node.db.operations.actions()].count("login-failed") == statuses.count(401)


def _rss() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("both_backends", ["sqlite"], indirect=True)  # memory of hashing: no database's part
def test_login_flood_hashes_a_few_at_a_time(tmp_path, tiny_model_path):
    """40 logins at once from 40 addresses (through a trusted proxy, so the limiter lets each
    try): the node's memory grows by at most a few Argon2 hashes (64 MiB each), not 40 of them,
    and every login gets an answer (401, or 503 when it waited too long for its turn)."""
    import threading

    from dicom_node.web.auth import HASHES_AT_ONCE

    with Receiver("PACS") as pacs, _password_node(tmp_path, tiny_model_path, pacs.port,
                                                  trusted_proxies=["127.0.0.1"]) as node:
        login = RawLogin(node.web.url)
        assert login.post(WRONG, "192.0.2.250") == 401  # the dummy hash and the threads exist now
        before, peak, done = _rss(), [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _rss())
                done.wait(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            statuses = login.at_once(40, WRONG, lambda i: f"192.0.2.{i}")
        finally:
            done.set()
            sampler.join()
        grown = (peak[0] - before) / 2**20
        assert set(statuses) <= {401, 503} and statuses.count(401) >= 1, statuses
        assert grown < 64 * (HASHES_AT_ONCE + 2), f"memory grew by {grown:.0f} MiB during the flood"


def test_console_answers_400_for_ids_that_are_not_ids(tmp_path, tiny_model_path):
    with Receiver("PACS") as pacs, _node(tmp_path, tiny_model_path, pacs.port) as node:
        web = Browserless(node.web.url)
        web.login_with_token(_token(node))
        csrf = web.csrf("/failures")
        for bad in ("abc", "1" * 40, "-1", "1e3", "9223372036854775808", "١٢"):
            status, _, body = web.post("/requeue", {"csrf_token": csrf, "instance_id": bad})
            assert status == 400 and "instance_id" in body, (bad, status, body[:200])
        assert web.post("/requeue", {"csrf_token": csrf, "instance_id": "12"})[0] == 303  # none such: nothing to do
        for path in ("/previews/" + "9" * 5000 + ".png", "/previews/abc.png", "/previews/" + "1" * 40 + ".png"):
            assert web.get(path, accept="image/png")[0] == 400, path
        assert web.get("/previews/12.png", accept="image/png")[0] == 404
        assert web.get("/failures")[0] == 200  # and the console goes on

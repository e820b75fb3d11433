"""Console benchmark: does serving the web console delay C-STORE answers?

The console runs inside the node's process (its own thread and event loop, its own database
connection).  This measures what a sender sees, per C-STORE, in the same run and on the
same machine, for four set-ups of one node (quiet period 1 h, so no translation competes):

* ``web off``      the node with ``web: null``;
* ``web idle``     the console on, nobody looking;
* ``web watched``  a browser-like client and Prometheus: every page and /metrics once a second;
* ``web hammered`` one client fetching the overview, studies, failures pages, /metrics and
  /health/ready back to back as fast as the node answers (far beyond real use);
* ``login flood``  40 clients sending wrong passwords back to back, each login from a new
  address (through a trusted proxy, so the failed-login limit never stops them): every one
  costs an Argon2 check (64 MiB), which the console runs one at a time (goal: C-STORE p95
  within 1.5x of ``web idle``; before the bound, 40 at once made it 25 -> 850 ms).

The load runs in a separate process.  Each run sends ``--images`` small CR images over one
association (pynetdicom SCU); the order of the set-ups rotates between repeats.  Prints a
table last and writes ``bench/results/console.json`` (machine, versions, raw timings).
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import re
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import machine_info  # noqa: E402
from bench.node import CALLED_AE, LOOPBACK, free_port, make_model, stop, write_radiographs  # noqa: E402
from tests.peers import wait_for_port  # noqa: E402

PAGES = ["/", "/studies", "/failures", "/metrics", "/health/ready"]
SETUPS = ["web off", "web idle", "web watched", "web hammered", "login flood"]
FLOODERS = 40
USER, PASSWORD = "bench", "bench password"


def start_node(work: Path, model: Path, web: bool):
    import subprocess

    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "node": {"ae_title": "DICOMNODE", "host": LOOPBACK, "port": port, "max_associations": 16},
        "storage": {"spool_dir": str(work / "spool"), "min_free_bytes": 0},
        "study_stable_seconds": 3600,
        "models": {"bench": {"path": str(model), "device": "cpu", "tile": 0}},
        "destinations": {"outbox": {"type": "folder", "path": str(work / "outbox")}},
        "routes": [{"called_ae": CALLED_AE, "model": "bench", "destinations": ["outbox"]}],
        "web": {"host": LOOPBACK, "port": 0, "users": {USER: _hash(PASSWORD)}, "trusted_proxies": [LOOPBACK]}
        if web else None,
    }
    (work / "config.yaml").write_text(json.dumps(config))
    log = work / "node.log"
    proc = subprocess.Popen([sys.executable, "-m", "dicom_node", "serve", "--config", str(work / "config.yaml")],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=str(work))
    wait_for_port(port, timeout=60.0, proc=proc)
    base = None
    if web:
        deadline = time.monotonic() + 30
        while base is None and time.monotonic() < deadline:
            m = re.search(r"console on (http://\S+?)/? ", log.read_text(errors="replace"))
            base = m.group(1).rstrip("/") if m else None
            time.sleep(0.1)
    return proc, port, base


def _hash(password: str) -> str:
    from dicom_node.web.auth import hash_password

    return hash_password(password)


def login_form(base: str) -> tuple[str, str]:
    """(CSRF token, login cookie) of a fresh login page."""
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(base + "/login", timeout=30) as r:
        html, cookie = r.read().decode(), r.headers["set-cookie"]
    return (re.search(r'name="csrf_token" value="([^"]+)"', html).group(1),
            re.search(r"dicom_node_login=([^;]+)", cookie).group(1))


def post_login(base: str, csrf: str, cookie: str, password: str, forwarded: str | None = None) -> http.client.HTTPResponse:
    host, port = base.split("//")[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Cookie": f"dicom_node_login={cookie}"}
    if forwarded:
        headers["X-Forwarded-For"] = forwarded
    conn.request("POST", "/login", urllib.parse.urlencode({"csrf_token": csrf, "user": USER, "password": password}),
                 headers)
    return conn.getresponse()


def flood(base: str, stop_at: mp.Event, answers) -> None:
    """``FLOODERS`` threads sending wrong passwords back to back, each from a new address;
    ``answers``: counts of 401, 503 and anything else."""
    import threading

    def one(k: int) -> None:
        csrf, cookie = login_form(base)
        n = 0
        while not stop_at.is_set():
            n += 1
            try:
                status = post_login(base, csrf, cookie, "wrong", f"10.{k}.{n // 250 % 250}.{n % 250 + 1}").status
            except OSError:
                status = 0
            with answers.get_lock():
                answers[{401: 0, 503: 1}.get(status, 2)] += 1

    threads = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(FLOODERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def load(base: str, interval: float, stop_at: mp.Event, counts) -> None:
    """A logged-in client fetching every page (``interval`` 0: back to back)."""
    import http.cookiejar

    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), urllib.request.HTTPCookieProcessor(jar))
    csrf, cookie = login_form(base)
    session = post_login(base, csrf, cookie, PASSWORD).getheader("set-cookie")
    opener.addheaders = [("Cookie", re.search(r"(dicom_node_session=[^;]+)", session).group(1))]
    while not stop_at.is_set():
        t0 = time.monotonic()
        for page in PAGES:
            try:
                opener.open(urllib.request.Request(base + page, headers={"Accept": "text/html"}), timeout=30).read()
                counts.value += 1
            except Exception:  # noqa: BLE001 - 503 from /health/ready etc.: still a request served
                counts.value += 1
        if interval:
            stop_at.wait(max(0.0, interval - (time.monotonic() - t0)))


def send(port: int, files: list[Path]) -> list[float]:
    """Seconds per C-STORE (request sent to answer received), one association."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.sop_class import ComputedRadiographyImageStorage

    ae = AE(ae_title="BENCHSCU")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate(LOOPBACK, port, ae_title=CALLED_AE)
    if not assoc.is_established:
        raise RuntimeError("association failed")
    times = []
    try:
        for f in files:
            t0 = time.perf_counter()
            rsp = assoc.send_c_store(f)
            times.append(time.perf_counter() - t0)
            if not rsp or int(rsp.get("Status", -1)) != 0:
                raise RuntimeError(f"C-STORE failed: {rsp}")
    finally:
        assoc.release()
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=150, help="C-STOREs per run")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--cols", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "console.json")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-console-"))
    model = make_model(work / "bench.safetensors", 4, 1)
    nodes = {"web off": start_node(work / "off", model, web=False), "web on": start_node(work / "on", model, web=True)}
    runs: dict[str, list[list[float]]] = {s: [] for s in SETUPS}
    requests: dict[str, list[int]] = {s: [] for s in SETUPS}
    floods: list[dict[str, int]] = []
    try:
        warm = write_radiographs(work / "warm", 10, args.rows, args.cols)
        for proc, port, _ in nodes.values():
            send(port, warm)
        for rep in range(args.repeats):
            k = rep % len(SETUPS)
            for setup in SETUPS[k:] + SETUPS[:k]:
                proc, port, login = nodes["web off" if setup == "web off" else "web on"]
                files = write_radiographs(work / f"run-{rep}-{setup.replace(' ', '-')}", args.images,
                                          args.rows, args.cols)
                stop_at, counts, loader = mp.Event(), mp.Value("i", 0), None
                answers = mp.Array("i", 3)
                if setup in ("web watched", "web hammered"):
                    loader = mp.Process(target=load, args=(login, 1.0 if setup == "web watched" else 0.0,
                                                           stop_at, counts), daemon=True)
                elif setup == "login flood":
                    loader = mp.Process(target=flood, args=(login, stop_at, answers), daemon=True)
                if loader is not None:
                    loader.start()
                    time.sleep(2.0)  # logged in and loading
                start, answered = counts.value, list(answers)
                t0 = time.monotonic()
                times = send(port, files)
                elapsed = time.monotonic() - t0
                served = counts.value - start
                if setup == "login flood":
                    n401, n503, other = (a - b for a, b in zip(answers, answered))
                    served = n401 + n503 + other
                    floods.append({"seconds": elapsed, "401": n401, "503": n503, "other": other})
                    print(f"  {'':13s}   logins answered: {n401} checked (401), {n503} busy (503), {other} other, "
                          f"{n401 / elapsed:.1f} Argon2 checks/s", flush=True)
                stop_at.set()
                if loader is not None:
                    loader.join(10)
                runs[setup].append(times)
                requests[setup].append(served)
                print(f"  {setup:13s} run {rep + 1}: median {statistics.median(times) * 1e3:6.2f} ms per C-STORE, "
                      f"{served} HTTP requests served meanwhile", flush=True)
    finally:
        for proc, _, _ in nodes.values():
            stop(proc)
    flat = {s: [t for r in v for t in r] for s, v in runs.items()}
    median = {s: statistics.median(v) for s, v in flat.items()}
    p95 = {s: statistics.quantiles(v, n=20)[-1] for s, v in flat.items()}
    result = {
        "machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()},
        "seconds_per_cstore": runs, "http_requests_during_run": requests,
        "median_ms": {s: v * 1e3 for s, v in median.items()}, "p95_ms": {s: v * 1e3 for s, v in p95.items()},
        "ratio_median_vs_web_off": {s: median[s] / median["web off"] for s in SETUPS},
        "ratio_p95_vs_web_off": {s: p95[s] / p95["web off"] for s in SETUPS},
        "ratio_p95_vs_web_idle": {s: p95[s] / p95["web idle"] for s in SETUPS},
        "login_flood": {"clients": FLOODERS, "runs": floods},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nC-STORE answer time, {args.images} images of {args.rows}x{args.cols} per run, {args.repeats} runs "
          f"({result['machine'].get('cpu', '?')})")
    print(f"{'set-up':14s} {'median ms':>10s} {'p95 ms':>8s} {'median ratio':>13s} {'p95 ratio':>10s} "
          f"{'p95 vs idle':>12s} {'HTTP req/run':>13s}")
    for s in SETUPS:
        print(f"{s:14s} {median[s] * 1e3:10.2f} {p95[s] * 1e3:8.2f} {result['ratio_median_vs_web_off'][s]:13.2f} "
              f"{result['ratio_p95_vs_web_off'][s]:10.2f} {result['ratio_p95_vs_web_idle'][s]:12.2f} "
              f"{statistics.median(requests[s]):13.0f}")
    print("(ratios against web off, p95 vs idle against web idle; HTTP requests of the login flood: logins answered)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

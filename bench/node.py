"""Node benchmark: receive throughput against pynetdicom's storescp, and end-to-end latency.

Receiving is measured over DIMSE (C-STORE, one association) and over STOW-RS (one
``POST /dicomweb/{called_ae}/studies`` request per run, the same number and size of instances,
streamed from disk with ``http.client``), on the same node in the same rotation.

Why: the node persists every instance durably (fsync + SQLite commit) before it answers
Success, which costs time a plain "write and forget" SCP does not pay.  The goal is to
stay within 10 % of pynetdicom's bundled ``storescp`` on the same machine, in the same
run.  The second half measures what a radiologist waits for: from the last instance of a
study being acknowledged to the Secondary Capture series arriving at the PACS, split into
the quiet-period wait, translation and delivery (from the node's own log timestamps).

Run: ``python bench/node.py`` (``--help`` for sizes).  Prints a table last and writes
``bench/results/node.json`` (machine, versions, raw timings, medians).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import machine  # noqa: E402  (bench/ is on sys.path when run as a script)
import numpy as np  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from tests.factory import make_dataset, phantom  # noqa: E402
from tests.peers import wait_for_port  # noqa: E402

CALLED_AE = "BENCH_STYLE"
LOOPBACK = "127.0.0.1"
STOW_TOKEN = "bench-stow-rs-token"
STOW_BOUNDARY = "dicom-node-bench-boundary"


# ----------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def machine_info() -> dict:
    """The shared machine facts plus the DICOM stack's versions, for the results file."""
    versions = {"python": platform.python_version()}
    for mod in ("numpy", "pydicom", "pynetdicom", "torch", "dicom_node"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - informational only
            versions[mod] = None
    dcmtk = None
    if shutil.which("storescu"):
        out = subprocess.run(["storescu", "--version"], capture_output=True, text=True).stdout
        dcmtk = out.split("\n", 1)[0].strip()
    versions["dcmtk"] = dcmtk
    return {**machine.machine_info(), "versions": versions}


def write_radiographs(folder: Path, count: int, rows: int, cols: int, *, study_uid: str | None = None,
                      pixels: list[np.ndarray] | None = None) -> list[Path]:
    """``count`` uncompressed 16-bit CR files with fresh UIDs (one study, one series).

    Fresh UIDs every time: the node acknowledges a duplicate SOP Instance UID without
    writing it again, which would flatter its throughput.
    """
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    if pixels is None:
        pixels = [phantom(rows, cols, 12, seed=s) for s in range(3)]
    paths = []
    for i in range(count):
        ds = make_dataset(pixels[i % len(pixels)], study_uid=study_uid, series_uid=series_uid)
        ds.InstanceNumber = i + 1
        path = folder / f"{i:03d}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths


def send_files(port: int, called_ae: str, files: list[Path], info: dict | None = None
               ) -> tuple[float, float, list[int]]:
    """Send ``files`` in one association (pynetdicom SCU, streamed from disk).

    Returns (seconds from association start to the last response, time.time() of the last
    response, statuses); ``info['peer_max_pdu']`` gets the receiver's advertised max PDU.
    """
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import ComputedRadiographyImageStorage

    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="BENCHSCU")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    ae.maximum_pdu_size = 0
    t0 = time.perf_counter()
    assoc = ae.associate(LOOPBACK, port, ae_title=called_ae)
    if not assoc.is_established:
        raise RuntimeError(f"association to port {port} failed")
    if info is not None:
        info["peer_max_pdu"] = assoc.acceptor.maximum_length
    statuses = []
    try:
        for f in files:
            rsp = assoc.send_c_store(f)
            statuses.append(int(rsp.get("Status", -1)) if rsp else -1)
        t_last = time.time()
        elapsed = time.perf_counter() - t0
    finally:
        assoc.release()
    return elapsed, t_last, statuses


def post_files(web_port: int, called_ae: str, files: list[Path]) -> tuple[float, list[int]]:
    """Send ``files`` in one STOW-RS request (multipart/related streamed from disk).

    Returns (seconds from the request's start to its complete answer, per-file status: 0 for
    an instance in the answer's ReferencedSOPSequence, else its FailureReason or -1).
    """
    import http.client

    delimiter = f"--{STOW_BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    end = f"--{STOW_BOUNDARY}--\r\n".encode()
    length = sum(len(delimiter) + f.stat().st_size + 2 for f in files) + len(end)

    def body():
        for f in files:
            yield delimiter
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    yield chunk
            yield b"\r\n"
        yield end

    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(LOOPBACK, web_port, timeout=600)
    try:
        conn.request("POST", f"/dicomweb/{called_ae}/studies", body=body(), headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={STOW_BOUNDARY}',
            "Content-Length": str(length), "Authorization": f"Bearer {STOW_TOKEN}",
            "Accept": "application/dicom+json"})
        rsp = conn.getresponse()
        answer = rsp.read()
    finally:
        conn.close()
    elapsed = time.perf_counter() - t0
    if rsp.status not in (200, 202, 409):
        raise RuntimeError(f"STOW-RS answered {rsp.status}: {answer[:200]!r}")
    stored = {i["00081155"]["Value"][0] for i in json.loads(answer).get("00081199", {}).get("Value", [])}
    import pydicom

    uids = [str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
            for f in files]
    return elapsed, [0 if u in stored else -1 for u in uids]


# ----------------------------------------------------------------------------- receivers


class Storescp:
    """pynetdicom's bundled storescp (``python -m pynetdicom storescp``) writing to disk."""

    def __init__(self, workdir: Path, ae_title: str = "STORESCP", max_pdu: int | None = None,
                 name: str = "storescp") -> None:
        self.out = workdir / f"{name}-out"
        self.out.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.ae_title = ae_title
        self.log = open(workdir / f"{name}.log", "ab")
        # max_pdu None: the app's default (16382 bytes); otherwise the receive PDU it advertises.
        pdu = [] if max_pdu is None else ["-pdu", str(max_pdu)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pynetdicom", "storescp", str(self.port), "-aet", ae_title, "-od", str(self.out),
             *pdu, "-ba", LOOPBACK, "-q"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, timeout=60.0, proc=self.proc)

    def files(self) -> list[Path]:
        return [p for p in self.out.iterdir() if p.is_file()]

    def clear(self) -> None:
        for p in self.files():
            p.unlink()

    def stop(self) -> None:
        stop(self.proc)
        self.log.close()


class Node:
    """``dicom-node serve`` as a subprocess with a generated config; logs go to a file."""

    def __init__(self, workdir: Path, model: Path, *, stable_seconds: float, destination_port: int | None,
                 name: str = "node", stow_rs: bool = False) -> None:
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.web_port = free_port() if stow_rs else None
        self.log_path = self.dir / "node.log"
        dest = ({"pacs": {"type": "dicom", "ae_title": "STORESCP", "host": LOOPBACK, "port": destination_port}}
                if destination_port else {"outbox": {"type": "folder", "path": str(self.dir / "outbox")}})
        config = {
            "node": {"ae_title": "DICOMNODE", "host": LOOPBACK, "port": self.port, "max_associations": 16},
            "storage": {"spool_dir": str(self.dir / "spool"), "min_free_bytes": 0},
            "study_stable_seconds": stable_seconds,
            "models": {"bench": {"path": str(model), "device": "cpu", "tile": 0}},
            "destinations": dest,
            "routes": [{"called_ae": CALLED_AE, "model": "bench", "destinations": list(dest)}],
            "retry": {"max_attempts": 3, "backoff_seconds": [1]},
            "web": None,  # the console is measured in bench/console.py
        }
        if stow_rs:  # the web server for STOW-RS ingest only (its console pages are not used)
            from dicom_node.web.auth import hash_password

            config["web"] = {"host": LOOPBACK, "port": self.web_port, "stow_rs": {"tokens": [hash_password(STOW_TOKEN)]}}
        cfg = self.dir / "config.yaml"
        cfg.write_text(json.dumps(config, indent=1))  # JSON is valid YAML
        self.logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "dicom_node", "serve", "--config", str(cfg)],
                                     stdout=self.logf, stderr=subprocess.STDOUT, cwd=str(self.dir))
        wait_for_port(self.port, timeout=60.0, proc=self.proc)
        if self.web_port:
            wait_for_port(self.web_port, timeout=60.0, proc=self.proc)

    def stop(self) -> None:
        stop(self.proc)
        self.logf.close()

    def log_events(self) -> list[tuple[float, str]]:
        """(epoch seconds, message) for every log line (format of dicom_node.cli)."""
        events = []
        pattern = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \w+ [\w.]+: (.*)$")
        for line in self.log_path.read_text(errors="replace").splitlines():
            m = pattern.match(line)
            if m:
                t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1000
                events.append((t, m.group(3)))
        return events


def make_model(path: Path, ngf: int, blocks: int) -> Path:
    from dicom_node.engine import new_style_model, save_style_model

    save_style_model(new_style_model(ngf=ngf, n_blocks=blocks, seed=0), path, name="bench", version="1")
    return path


# ----------------------------------------------------------------------------- phases


def throughput_phase(work: Path, model: Path, args) -> dict:
    """Rotate node and baseline runs of ``args.images`` radiographs, one association each.

    Two baselines, so the comparison cannot be won by a PDU setting: pynetdicom's storescp
    as shipped (16382-byte PDUs) and the same app advertising the node's own max PDU.  The
    goal is judged against the faster of the two.  ``node-stow-rs``: the same node receiving
    the same number and size of instances in one STOW-RS request.
    """
    pixels = [phantom(args.rows, args.cols, 12, seed=s) for s in range(3)]
    # The quiet period is long so the node's worker stays idle: this measures receiving.
    node = Node(work, model, stable_seconds=3600, destination_port=None, name="node-throughput", stow_rs=True)
    baselines: dict[str, Storescp] = {}
    runs: dict[str, list[dict]] = {}
    try:
        probe: dict = {}
        files = write_radiographs(work / "warm-node", 3, args.rows, args.cols, pixels=pixels)
        send_files(node.port, CALLED_AE, files, probe)  # warm-up, and learn the node's max PDU
        shutil.rmtree(work / "warm-node")
        node_pdu = int(probe["peer_max_pdu"])
        baselines["storescp-default-pdu"] = Storescp(work, name="storescp-default")
        baselines[f"storescp-pdu-{node_pdu}"] = Storescp(work, max_pdu=node_pdu, name="storescp-matched")
        receivers = {name: (b.port, "STORESCP") for name, b in baselines.items()}
        receivers["node"] = (node.port, CALLED_AE)
        receivers["node-stow-rs"] = (node.web_port, CALLED_AE)
        files = write_radiographs(work / "warm-stow", 3, args.rows, args.cols, pixels=pixels)
        post_files(node.web_port, CALLED_AE, files)  # warm-up (and the token's one Argon2 check)
        shutil.rmtree(work / "warm-stow")
        for name, (port, aet) in receivers.items():
            if name in baselines:  # warm-up the baselines too
                files = write_radiographs(work / f"warm-{name}", 3, args.rows, args.cols, pixels=pixels)
                send_files(port, aet, files)
                shutil.rmtree(work / f"warm-{name}")
                baselines[name].clear()
            runs[name] = []
        names = list(receivers)
        for rep in range(args.repeats):
            k = rep % len(names)  # rotate who goes first, so drift in machine load favours no one
            for name in names[k:] + names[:k]:
                port, aet = receivers[name]
                folder = work / f"send-{name}-{rep}"
                files = write_radiographs(folder, args.images, args.rows, args.cols, pixels=pixels)
                nbytes = sum(f.stat().st_size for f in files)
                os.sync()  # nothing of the previous run still being written back
                if name == "node-stow-rs":
                    elapsed, statuses = post_files(port, aet, files)
                else:
                    elapsed, _, statuses = send_files(port, aet, files)
                ok = sum(s == 0 for s in statuses)
                runs[name].append({"seconds": elapsed, "bytes": nbytes, "images": len(files), "success": ok,
                                   "mb_per_s": nbytes / elapsed / 1e6, "images_per_s": len(files) / elapsed})
                print(f"  {name:22s} run {rep + 1}: {elapsed:6.2f} s  {nbytes / elapsed / 1e6:7.1f} MB/s  "
                      f"({ok}/{len(files)} success)", flush=True)
                shutil.rmtree(folder)
                if name in baselines:
                    baselines[name].clear()
    finally:
        node.stop()
        for b in baselines.values():
            b.stop()
    med = {k: statistics.median(r["mb_per_s"] for r in v) for k, v in runs.items()}
    best = max((k for k in med if k in baselines), key=lambda k: med[k])
    return {"runs": runs, "median_mb_per_s": med, "node_max_pdu": node_pdu, "best_baseline": best,
            "ratio_node_vs_best_storescp": med["node"] / med[best],
            "ratio_node_vs_each": {k: med["node"] / v for k, v in med.items() if k in baselines},
            "ratio_stow_rs_vs_cstore": med["node-stow-rs"] / med["node"],
            "image_bytes": runs["node"][0]["bytes"] // runs["node"][0]["images"],
            "note": "pynetdicom storescp writes files without fsync; the node fsyncs the file and its "
                    "directory and commits SQLite (WAL, synchronous=FULL) before answering Success; "
                    "node-stow-rs: the same node, one STOW-RS request per run carrying the run's instances "
                    "(seconds: request start to complete answer; every instance stored as durably)"}


def _last(events: list[tuple[float, str]], needle: str, after: float = 0.0) -> float | None:
    hits = [t for t, msg in events if needle in msg and t >= after]
    return max(hits) if hits else None


def latency_phase(work: Path, model: Path, args) -> dict:
    """Studies of ``args.latency_images`` images: last ack -> SC series delivered, split from the log."""
    (work / "latency-dest").mkdir(exist_ok=True)
    dest = Storescp(work / "latency-dest")
    node = Node(work, model, stable_seconds=args.stable, destination_port=dest.port, name="node-latency")
    pixels = [phantom(args.rows, args.cols, 12, seed=s) for s in range(3)]
    runs = []
    try:
        for rep in range(args.latency_repeats + 1):  # the first study is a warm-up (model load)
            dest.clear()
            folder = work / f"lat-{rep}"
            files = write_radiographs(folder, args.latency_images, args.rows, args.cols, pixels=pixels)
            _, t_ack, statuses = send_files(node.port, CALLED_AE, files)
            deadline = time.time() + args.timeout
            while len(dest.files()) < len(files) and time.time() < deadline:
                time.sleep(0.02)
            t_arrived = time.time()
            if len(dest.files()) < len(files):
                raise RuntimeError(f"only {len(dest.files())}/{len(files)} outputs delivered in {args.timeout} s")
            time.sleep(0.6)  # let the node write its "delivered" log line
            ev = node.log_events()
            t_recv = _last(ev, "received sop", t_ack - 120)
            t_ready = _last(ev, "ready for translation", t_recv or 0)
            t_transl = _last(ev, " translated with ", t_recv or 0)
            t_deliv = _last(ev, "delivered", t_transl or 0)
            per_image = [float(m.group(1)) for _, msg in ev
                         if (m := re.search(r" translated with \S+ in ([\d.]+)s", msg)) and _ >= (t_recv or 0)]
            run = {"images": len(files), "success": sum(s == 0 for s in statuses),
                   "total_s": t_arrived - t_ack,
                   "stable_wait_s": (t_ready - t_recv) if t_ready and t_recv else None,
                   "translation_s": (t_transl - t_ready) if t_transl and t_ready else None,
                   "delivery_s": (t_deliv - t_transl) if t_deliv and t_transl else None,
                   "translate_per_image_s": per_image}
            shutil.rmtree(folder)
            label = "warm-up" if rep == 0 else f"run {rep}"
            print(f"  latency {label}: total {run['total_s']:.2f} s (stable {run['stable_wait_s']}, "
                  f"translate {run['translation_s']}, deliver {run['delivery_s']})", flush=True)
            if rep > 0:
                runs.append(run)
    finally:
        node.stop()
        dest.stop()

    def med(key):
        vals = [r[key] for r in runs if r[key] is not None]
        return statistics.median(vals) if vals else None

    return {"runs": runs, "study_stable_seconds": args.stable, "images_per_study": args.latency_images,
            "median_s": {k: med(k) for k in ("total_s", "stable_wait_s", "translation_s", "delivery_s")},
            "how": "total: SCU's last C-STORE response -> last SC file at the destination (pynetdicom storescp); "
                   "split from the node log: last 'received' -> 'ready for translation' -> last 'translated' "
                   "-> 'delivered'"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=30, help="radiographs per throughput run")
    p.add_argument("--rows", type=int, default=2500)
    p.add_argument("--cols", type=int, default=1400, help="2500x1400x16 bit = 7.0 MB per image")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--latency-images", type=int, default=4)
    p.add_argument("--latency-repeats", type=int, default=3)
    p.add_argument("--stable", type=float, default=2.0, help="study_stable_seconds in the latency phase")
    p.add_argument("--ngf", type=int, default=8)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "node.json")
    args = p.parse_args(argv)

    info = machine_info()
    work = Path(tempfile.mkdtemp(prefix="bench-node-"))
    try:
        model = make_model(work / "bench.safetensors", args.ngf, args.blocks)
        print(f"throughput: {args.images} x {args.rows}x{args.cols} 16-bit CR, one association, "
              f"{args.repeats} runs each (after warm-up)", flush=True)
        thr = throughput_phase(work, model, args)
        lat = None if args.skip_latency else latency_phase(work, model, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {"benchmark": "node", "date": datetime.now().isoformat(timespec="seconds"), "machine": info,
              "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "model": {"ngf": args.ngf, "blocks": args.blocks, "device": "cpu", "tile": 0},
              "throughput": thr, "latency": lat}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nresults written to {args.out}")
    print(f"{'measure':50s} {'median':>12s}")
    for name, value in thr["median_mb_per_s"].items():
        label = {"node": "dicom-node C-STORE (durable)", "node-stow-rs": "dicom-node STOW-RS (durable)"}.get(
            name, f"{name} (pynetdicom)")
        print(f"{'receive MB/s, ' + label:50s} {value:12.1f}")
    print(f"{'ratio node / best storescp (goal >= 0.90)':50s} {thr['ratio_node_vs_best_storescp']:12.2f}")
    print(f"{'ratio node STOW-RS / node C-STORE':50s} {thr['ratio_stow_rs_vs_cstore']:12.2f}")
    if lat:
        for key, label in (("total_s", "end-to-end: last ack -> delivered (s)"),
                           ("stable_wait_s", "  quiet-period wait (s)"),
                           ("translation_s", "  translation (s)"),
                           ("delivery_s", "  delivery (s)")):
            val = lat["median_s"][key]
            print(f"{label:50s} {val if val is None else f'{val:12.2f}':>12}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Scale-out benchmark: one versus two worker processes on one PostgreSQL queue, and claim latency.

Why: several nodes share one queue (``storage.database: postgresql://...``, ``serve --role``);
what a second worker buys, and whether claiming stays cheap when the queue is long, are
measured here, in one run, as ratios (these machines are noisy and differ from each other).

1. End to end: a receiving node (``--role receive``) takes ``--images`` small radiographs in
   ``--studies`` studies while no worker runs; then 1 or 2 ``--role worker`` processes
   translate (a tiny model on the CPU, so the pipeline and the queue are measured, not the
   model) and deliver to dcmtk ``storescp`` (pynetdicom's test SCP when dcmtk is missing).
   Throughput is counted from the PACS's arrivals between 10 % and 90 % of the load, so the
   workers' start-up is not in it.  Runs alternate 1, 2, 1, 2, ...
2. Claim latency: one claim (lease one ready instance, one transaction) with 1 000 and with
   100 000 rows in the queue, on PostgreSQL and on SQLite; and delivery-batch claims.

Run: ``python bench/scale.py`` (``--help``).  Needs PostgreSQL's ``initdb``/``pg_ctl``.
Prints a table last and writes ``bench/results/scale.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import machine  # noqa: E402  (bench/ is on sys.path when run as a script)
from pydicom.uid import generate_uid  # noqa: E402

from dicom_node.state import StateDB  # noqa: E402
from tests.factory import make_dataset  # noqa: E402
from tests.postgres import PostgresServer  # noqa: E402

CALLED_AE = "BENCH_STYLE"


# ----------------------------------------------------------------------------- end to end


def write_load(folder: Path, images: int, studies: int, size: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    per_study = max(1, images // studies)
    study = series = ""
    for i in range(images):
        if i % per_study == 0:
            study, series = generate_uid(), generate_uid()
        ds = make_dataset(rows=size, cols=size, study_uid=study, series_uid=series, seed=i % 7)
        ds.InstanceNumber = i % per_study + 1
        files.append(folder / f"{i:05d}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    return files


class Pacs:
    """dcmtk storescp (files named by SOP UID; arrival time = file time), else pynetdicom's."""

    def __init__(self, folder: Path) -> None:
        from tests import nodeproc
        from tests.peers import StoreSCP

        self.folder = folder
        self._dcmtk = shutil.which("storescp") is not None
        if self._dcmtk:
            self.scp = StoreSCP(folder, ae_title="PACS").start()
            self.port = self.scp.port
        else:
            self.scp = nodeproc.Receiver("PACS").start()
            self.port = self.scp.port
            self._times: list[float] = []

    def arrivals(self) -> list[float]:
        if self._dcmtk:
            times = []
            for f in self.folder.iterdir():
                try:
                    times.append(f.stat().st_mtime)
                except OSError:
                    pass  # being renamed
            return sorted(times)
        n = len(self.scp.received)
        self._times += [time.time()] * (n - len(self._times))
        return list(self._times)

    def clear(self) -> None:
        if self._dcmtk:
            for f in self.folder.iterdir():
                f.unlink()
        else:
            self.scp.received.clear()
            self._times = []

    def stop(self) -> None:
        self.scp.stop()


def node_config(work: Path, url: str, model: Path, pacs_port: int, name: str, stable: float) -> dict:
    return {
        "node": {"name": name, "ae_title": "BENCHNODE", "max_associations": 8},
        "storage": {"spool_dir": str(work / "spool"), "database": url, "min_free_bytes": 0},
        "study_stable_seconds": stable,
        "models": {"tiny": {"path": str(model), "device": "cpu", "tile": 0}},
        "destinations": {"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}},
        "routes": [{"called_ae": CALLED_AE, "model": "tiny", "destinations": ["pacs"]}],
        "retry": {"max_attempts": 20, "backoff_seconds": [0.5]},
        "web": None,
    }


def end_to_end(work: Path, server: PostgresServer, model: Path, files: list[Path], workers: int,
               args: argparse.Namespace) -> dict:
    from tests.peers import NodeProcess, storescu

    url = server.new_database()
    run = work / f"run-{workers}-{time.monotonic_ns()}"
    pacs = Pacs(run / "pacs")
    nodes = []
    try:
        receiver = NodeProcess(run / "receiver", node_config(run, url, model, pacs.port, "receiver", args.stable),
                               role="receive")
        nodes.append(receiver.start(120))
        t0 = time.time()
        for start in range(0, len(files), 100):  # a modality's associations
            done = storescu(files[start:start + 100], receiver.port, CALLED_AE, timeout=600)
            if done.returncode != 0:
                raise RuntimeError(f"storescu failed: {done.stderr[-500:]}")
        receive_s = time.time() - t0
        time.sleep(args.stable + 0.5)  # every study quiet: the whole load is waiting for the workers
        for i in range(workers):
            nodes.append(NodeProcess(run / f"worker{i}", node_config(run, url, model, pacs.port, f"worker{i}",
                                                                     args.stable), role="worker").launch())
        for n in nodes[1:]:
            n.wait_ready(120)
        deadline = time.monotonic() + args.timeout
        while len(pacs.arrivals()) < len(files):
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(pacs.arrivals())} of {len(files)} delivered in {args.timeout} s")
            time.sleep(0.2)
        times = pacs.arrivals()
        worker_cpu = sum(cpu_seconds(n.proc.pid) for n in nodes[1:])
        lo, hi = times[int(0.1 * len(times))], times[int(0.9 * len(times)) - 1]
        middle = int(0.9 * len(times)) - 1 - int(0.1 * len(times))
        return {"workers": workers, "images": len(files), "receive_s": round(receive_s, 2),
                "middle_80_percent_s": round(hi - lo, 3),
                "images_per_s": round(middle / (hi - lo), 2) if hi > lo else None,
                "first_to_last_s": round(times[-1] - times[0], 2),
                "worker_cpu_ms_per_image": round(1000 * worker_cpu / len(files), 1)}
    finally:
        for n in nodes:
            n.stop()
        pacs.stop()
        shutil.rmtree(run / "spool", ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), start-up included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- claim latency


def fill_queue(db: StateDB, rows: int) -> None:
    """``rows`` ready instances and as many pending deliveries, in one transaction (fast)."""
    now = time.time()
    with db.database.tx() as c:
        c.executemany("INSERT INTO instances (called_ae, calling_ae, sop_uid, sop_class, study_uid, series_uid, route, "
                      "path, size, state, received_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                      [("KIM", "CR1", f"1.2.{i}", "1.2.840.10008.5.1.4.1.1.1", f"2.{i // 50}", "3", "kim",
                        f"/spool/{i}.dcm", 1, "ready", now, now) for i in range(rows)])
        c.executemany("INSERT INTO deliveries (instance_id, destination, kind, sop_uid, path, state, next_attempt_at, "
                      "updated_at) VALUES (?,?,?,?,?,?,?,?)",
                      [(i + 1, "pacs", "output", f"9.{i}", f"/out/{i}.dcm", "pending", now, now) for i in range(rows)])


def claim_latency(target: "str | Path", rows: int, claims: int) -> dict:
    db = StateDB(target)
    db.cluster.register_node(node_id="bench.1", name="bench", role="worker", exclusive=False)
    fill_queue(db, rows)
    if db.database.dialect == "postgresql":
        db.database.conn.execute("ANALYZE")  # as autovacuum would soon after a bulk load
    one, batch = [], []
    for _ in range(claims):
        t0 = time.perf_counter()
        row = db.claim_ready()
        one.append(time.perf_counter() - t0)
        assert row is not None
        t0 = time.perf_counter()
        got = db.deliveries.claim(limit=200, only="pacs")
        batch.append(time.perf_counter() - t0)
        assert len(got) == min(200, rows)
        db.cluster.release_claims("deliveries", [d.id for d in got])  # the queue stays as long as it was
    db.close()
    return {"rows": rows, "claims": claims, "claim_ready_ms": _ms(one), "claim_200_deliveries_ms": _ms(batch)}


def _ms(values: list[float]) -> dict:
    v = sorted(values)
    return {"median": round(1000 * statistics.median(v), 3), "p95": round(1000 * v[int(0.95 * (len(v) - 1))], 3)}


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=240, help="radiographs per end-to-end run")
    p.add_argument("--studies", type=int, default=12)
    p.add_argument("--size", type=int, default=128, help="pixels per side (small: the pipeline is measured)")
    p.add_argument("--repeats", type=int, default=2, help="end-to-end runs per worker count (alternating)")
    p.add_argument("--stable", type=float, default=0.5, help="study_stable_seconds")
    p.add_argument("--rows", type=int, nargs="+", default=[1000, 100000], help="queue lengths for claim latency")
    p.add_argument("--claims", type=int, default=100)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--skip-end-to-end", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the work folder (the nodes' logs) and print its path")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scale.json")
    args = p.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # every worker process one thread: workers, not threads, scale
    from dicom_node.engine import new_style_model, save_style_model

    info = machine.machine_info()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    pg_root = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))  # the server runs as postgres: not under work
    server = PostgresServer(pg_root)
    e2e: list[dict] = []
    latency: dict[str, list[dict]] = {"postgresql": [], "sqlite": []}
    try:
        server.start()
        model = work / "tiny.safetensors"
        save_style_model(new_style_model(ngf=4, n_blocks=1, seed=0), model, name="tiny", version="1")
        if not args.skip_end_to_end:
            files = write_load(work / "load", args.images, args.studies, args.size)
            for r in range(args.repeats):
                for workers in (1, 2):
                    res = end_to_end(work, server, model, files, workers, args)
                    print(f"run {r + 1}: {workers} worker(s): {res['images_per_s']} images/s", flush=True)
                    e2e.append(res)
        for rows in args.rows:
            latency["postgresql"].append(claim_latency(server.new_database(), rows, args.claims))
            latency["sqlite"].append(claim_latency(work / f"state-{rows}.db", rows, args.claims))
            print(f"claim latency measured with {rows} rows", flush=True)
    finally:
        server.stop()
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(pg_root, ignore_errors=True)

    def med(workers: int) -> float | None:
        vals = [r["images_per_s"] for r in e2e if r["workers"] == workers and r["images_per_s"]]
        return round(statistics.median(vals), 2) if vals else None

    one, two = med(1), med(2)
    summary = {"images_per_s_1_worker": one, "images_per_s_2_workers": two,
               "ratio_2_vs_1_workers": round(two / one, 2) if one and two else None}
    for backend, rows in latency.items():
        if len(rows) >= 2:
            summary[f"{backend}_claim_ratio_{rows[-1]['rows']}_vs_{rows[0]['rows']}_rows"] = round(
                rows[-1]["claim_ready_ms"]["median"] / rows[0]["claim_ready_ms"]["median"], 2)
    result = {"benchmark": "scale", "date": datetime.now().isoformat(timespec="seconds"), "machine": info,
              "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "end_to_end": e2e, "claim_latency": latency, "summary": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nresults written to {args.out}")
    print(f"{'measure':58s} {'value':>10s}")
    if e2e:
        print(f"{'end to end, 1 worker process (images/s, median)':58s} {one!s:>10}")
        print(f"{'end to end, 2 worker processes (images/s, median)':58s} {two!s:>10}")
        print(f"{'ratio 2 / 1 workers':58s} {summary['ratio_2_vs_1_workers']!s:>10}")
    for backend, rows in latency.items():
        for r in rows:
            one_ms, batch_ms = r["claim_ready_ms"], r["claim_200_deliveries_ms"]
            print(f"{backend + ': claim one instance, %d rows (ms median/p95)' % r['rows']:58s} "
                  f"{one_ms['median']:>5.2f}/{one_ms['p95']:.2f}")
            print(f"{backend + ': claim 200 deliveries, %d rows (ms median/p95)' % r['rows']:58s} "
                  f"{batch_ms['median']:>5.2f}/{batch_ms['p95']:.2f}")
    for key, value in summary.items():
        if "claim_ratio" in key:
            print(f"{key:58s} {value!s:>10}")
    print(f"machine: {info['cpu']}, {info['cores']} cores (both worker processes share them)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

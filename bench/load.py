"""Load benchmark: 8 modalities sending at once; throughput and latency percentiles.

Why: the interop suite proves that concurrent associations lose and duplicate nothing;
this measures what they cost.  Eight sender *processes* (pynetdicom SCUs, so the GIL of
one sender does not throttle another) each open one association and send their own study
of ``--images`` radiographs to ``dicom-node serve``; a recording SCP stands in for the
PACS and notes when each Secondary Capture arrives.

Reported (median over ``--repeats`` runs after a warm-up run):
  * receive throughput (images/s, MB/s) from the first association to the last ack,
  * C-STORE response time percentiles (what a modality waits per image),
  * end-to-end latency percentiles per image: ack at the sender -> SC at the PACS
    (includes the study quiet period ``--stable``, translation and delivery),
  * end-to-end throughput (images/s through the whole node).

Run: ``python bench/load.py`` (``--help``).  Prints a table last and writes
``bench/results/load.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import node as nodebench  # noqa: E402  (bench/node.py: shared helpers)
import numpy as np  # noqa: E402

CALLED_AE = nodebench.CALLED_AE


def _sender(args: tuple[int, str, list[str]]) -> list[tuple[str, float, float, int]]:
    """One modality (runs in its own process): (sop uid, t_sent, t_acked, status) per image."""
    port, calling, files = args
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import ComputedRadiographyImageStorage

    _config.STORE_SEND_CHUNKED_DATASET = True
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    ae = AE(ae_title=calling)
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    assoc = ae.associate("127.0.0.1", port, ae_title=CALLED_AE)
    if not assoc.is_established:
        raise RuntimeError(f"{calling}: association refused")
    out = []
    try:
        for uid, f in zip(uids, files):
            t0 = time.time()
            rsp = assoc.send_c_store(f)
            out.append((uid, t0, time.time(), int(rsp.Status) if rsp and "Status" in rsp else -1))
    finally:
        assoc.release()
    return out


class Recorder:
    """A pynetdicom storage SCP standing in for the PACS: arrival time per referenced source."""

    def __init__(self) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

        self.arrivals: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        ae = AE(ae_title="STORESCP")
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.maximum_pdu_size = 0
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = self.server.server_address[1]

    def _on_store(self, event) -> int:
        t = time.time()
        ref = str(event.dataset.SourceImageSequence[0].ReferencedSOPInstanceUID)
        with self._lock:
            self.arrivals.setdefault(ref, []).append(t)
        return 0

    def count(self) -> int:
        with self._lock:
            return sum(len(v) for v in self.arrivals.values())

    def reset(self) -> None:
        with self._lock:
            self.arrivals = {}

    def stop(self) -> None:
        self.server.shutdown()


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def one_run(work: Path, node_port: int, recorder: Recorder, args, tag: str, pixels) -> dict:
    batches = []
    for s in range(args.senders):
        files = nodebench.write_radiographs(work / f"{tag}-m{s}", args.images, args.rows, args.cols, pixels=pixels)
        batches.append((node_port, f"CR_ROOM{s + 1}", [str(f) for f in files]))
    nbytes = sum(Path(f).stat().st_size for b in batches for f in b[2])
    recorder.reset()
    t_start = time.time()
    with ProcessPoolExecutor(max_workers=args.senders) as pool:
        results = list(pool.map(_sender, batches))
    sends = [r for batch in results for r in batch]
    t_last_ack = max(r[2] for r in sends)
    deadline = time.time() + args.timeout
    while recorder.count() < len(sends) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # duplicates, if any, would arrive now
    for b in batches:
        shutil.rmtree(Path(b[2][0]).parent, ignore_errors=True)
    arrivals = dict(recorder.arrivals)
    ok = [r for r in sends if r[3] == 0]
    e2e = [arrivals[uid][0] - acked for uid, _, acked, _ in ok if uid in arrivals]
    t_last_delivery = max((v[0] for v in arrivals.values()), default=float("nan"))
    return {
        "images": len(sends), "success": len(ok), "bytes": nbytes,
        "delivered": len(arrivals), "duplicates": sum(len(v) - 1 for v in arrivals.values()),
        "receive_seconds": t_last_ack - t_start,
        "receive_images_per_s": len(sends) / (t_last_ack - t_start),
        "receive_mb_per_s": nbytes / (t_last_ack - t_start) / 1e6,
        "store_response_s": {q: pct([r[2] - r[1] for r in sends], q) for q in (50, 90, 99, 100)},
        "end_to_end_s": {q: pct(e2e, q) for q in (50, 90, 99, 100)},
        "end_to_end_images_per_s": len(e2e) / (t_last_delivery - t_start) if e2e else None,
        "raw_store_response_s": [round(r[2] - r[1], 5) for r in sends],
        "raw_end_to_end_s": [round(v, 4) for v in e2e],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--senders", type=int, default=8)
    p.add_argument("--images", type=int, default=25, help="images per sender (one study each)")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--cols", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stable", type=float, default=2.0, help="study_stable_seconds")
    p.add_argument("--ngf", type=int, default=8)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--out", type=Path, default=nodebench.REPO / "bench" / "results" / "load.json")
    args = p.parse_args(argv)

    info = nodebench.machine_info()
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    recorder = Recorder()
    node = None
    runs = []
    try:
        model = nodebench.make_model(work / "bench.safetensors", args.ngf, args.blocks)
        node = nodebench.Node(work, model, stable_seconds=args.stable, destination_port=recorder.port,
                              name="node-load")
        pixels = [nodebench.phantom(args.rows, args.cols, 12, seed=s) for s in range(3)]
        print(f"{args.senders} senders x {args.images} images of {args.rows}x{args.cols} 16-bit, "
              f"quiet period {args.stable}s, model ngf{args.ngf}/{args.blocks} blocks on CPU", flush=True)
        for rep in range(args.repeats + 1):
            run = one_run(work, node.port, recorder, args, f"r{rep}", pixels)
            label = "warm-up" if rep == 0 else f"run {rep}"
            print(f"  {label}: receive {run['receive_images_per_s']:.1f} img/s, store p50 "
                  f"{run['store_response_s'][50] * 1000:.0f} ms, e2e p50 {run['end_to_end_s'][50]:.2f} s, "
                  f"delivered {run['delivered']}/{run['images']}, duplicates {run['duplicates']}", flush=True)
            if rep > 0:
                runs.append(run)
    finally:
        if node is not None:
            node.stop()
        recorder.stop()
        shutil.rmtree(work, ignore_errors=True)

    def med(get):
        return statistics.median(get(r) for r in runs)

    summary = {
        "receive_images_per_s": med(lambda r: r["receive_images_per_s"]),
        "receive_mb_per_s": med(lambda r: r["receive_mb_per_s"]),
        "end_to_end_images_per_s": med(lambda r: r["end_to_end_images_per_s"] or 0.0),
        **{f"store_response_p{q}_s": med(lambda r, q=q: r["store_response_s"][q]) for q in (50, 90, 99, 100)},
        **{f"end_to_end_p{q}_s": med(lambda r, q=q: r["end_to_end_s"][q]) for q in (50, 90, 99, 100)},
        "all_delivered": all(r["delivered"] == r["images"] for r in runs),
        "duplicates": sum(r["duplicates"] for r in runs),
    }
    result = {"benchmark": "load", "date": datetime.now().isoformat(timespec="seconds"), "machine": info,
              "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "runs": runs, "median": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nresults written to {args.out}")
    print(f"{'measure (median of runs)':40s} {'value':>10s}")
    rows = [("receive throughput (images/s)", summary["receive_images_per_s"]),
            ("receive throughput (MB/s)", summary["receive_mb_per_s"]),
            ("C-STORE response p50 (ms)", summary["store_response_p50_s"] * 1000),
            ("C-STORE response p90 (ms)", summary["store_response_p90_s"] * 1000),
            ("C-STORE response p99 (ms)", summary["store_response_p99_s"] * 1000),
            ("end-to-end p50 (s)", summary["end_to_end_p50_s"]),
            ("end-to-end p90 (s)", summary["end_to_end_p90_s"]),
            ("end-to-end p99 (s)", summary["end_to_end_p99_s"]),
            ("end-to-end throughput (images/s)", summary["end_to_end_images_per_s"]),
            ("duplicates delivered", summary["duplicates"])]
    for label, value in rows:
        print(f"{label:40s} {value:10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: whole-image pass vs. seamless tiled executor vs. naive tiling vs. MONAI.

Runnable alone from the repository root:

    python bench/engine.py [--ngf 16 --blocks 6 --size 2048 --tile 512 --overlap 0.25 --repeats 3 --device cpu]
    python bench/engine.py --ngf 64 --blocks 9 --device cuda     # GPU mode: also reports TFLOP/s

For each method: time per image (median of ``--repeats`` runs after one warm-up run) and the
deviation from the whole-image pass (mean / max |diff| in % of the output range 2).  MONAI's
``sliding_window_inference`` (gaussian blending, same tile, overlap and generator) is the
standard sliding-window baseline; it needs ``pip install monai`` (the ``bench`` extra) and is
skipped with a note when missing.  Prints a table last and writes bench/results/engine.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import machine_info  # noqa: E402  (bench/ is on sys.path when run as a script)
from tests.factory import trained_like_generator  # noqa: E402
from dicom_node.engine import new_style_model, translate  # noqa: E402
from dicom_node.engine.model_file import StyleModel  # noqa: E402
from dicom_node.engine.tiling import (  # noqa: E402
    _compute_dtype,
    _generator_on,
    _pad_input,
    resolve_device,
    translate_naive,
)
from flops import conv_flops  # noqa: E402  (bench/ is on sys.path when run as a script)

RANGE = 2.0
FLOOR_TFLOP_NGF64 = 6.2  # per 2048^2 image, ngf 64 / 9 blocks (docs/seamless.md "Measurements")


def phantom(size: int, seed: int = 0) -> np.ndarray:
    """A radiograph-like test image in model space [-1, 1] (body, ribs, noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    body = np.exp(-(((y - 0.5) / 0.45) ** 2 + ((x - 0.5) / 0.35) ** 2))
    ribs = 0.15 * (np.sin(y * 40) > 0.6)
    img = 0.15 + 0.6 * body + ribs * body + 0.02 * rng.standard_normal((size, size)).astype(np.float32)
    return (np.clip(img, 0, 1) * 2 - 1).astype(np.float32)


def monai_translate(model: StyleModel, image: np.ndarray, tile: int, overlap: float, dev: torch.device,
                    precision: str) -> np.ndarray:
    """MONAI sliding_window_inference with gaussian blending around the same generator."""
    from monai.inferers import sliding_window_inference

    cdtype = _compute_dtype(dev, precision)
    gen = _generator_on(model.generator, dev)
    h, w = image.shape
    x = _pad_input(torch.from_numpy(image)[None, None]).to(dev)

    def predictor(t: torch.Tensor) -> torch.Tensor:
        if dev.type == "cuda":
            with torch.autocast("cuda", dtype=cdtype, enabled=cdtype != torch.float32):
                return gen(t.contiguous(memory_format=torch.channels_last)).float()
        return gen(t)

    with torch.inference_mode():
        y = sliding_window_inference(x, roi_size=(tile, tile), sw_batch_size=1, predictor=predictor,
                                     overlap=overlap, mode="gaussian")
    return torch.as_tensor(y)[0, 0, :h, :w].float().cpu().numpy().copy()


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    try:
        import monai

        out["monai"] = monai.__version__
    except ImportError:
        out["monai"] = None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ngf", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU) or fp32")
    ap.add_argument("--init", choices=["fresh", "trained-like"], default="fresh")
    ap.add_argument("--skip", default="", help="comma-separated methods to skip (naive,monai)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "engine.json"))
    args = ap.parse_args(argv)

    dev = resolve_device(args.device)
    gen = (new_style_model(ngf=args.ngf, n_blocks=args.blocks, seed=0) if args.init == "fresh"
           else trained_like_generator(args.ngf, args.blocks))
    model = StyleModel(gen, {"name": f"bench-{args.init}"})
    image = phantom(args.size)
    flops = conv_flops(gen, args.size, args.size)
    load_before = os.getloadavg()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    kw = {"device": dev, "precision": args.precision}
    methods = {
        "whole": lambda: translate(model, image, tile=0, **kw),
        "seamless": lambda: translate(model, image, tile=args.tile, overlap=args.overlap, **kw),
        "naive": lambda: translate_naive(model, image, tile=args.tile, overlap=args.overlap, **kw),
        "monai": lambda: monai_translate(model, image, args.tile, args.overlap, dev, args.precision),
    }
    skipped = {s.strip() for s in args.skip.split(",") if s.strip()}
    notes = []
    try:
        import monai  # noqa: F401
    except ImportError:
        skipped.add("monai")
        notes.append("monai not installed (pip install monai): MONAI baseline skipped")

    results: dict[str, dict] = {}
    ref = None
    for name, fn in methods.items():
        if name in skipped:
            continue
        print(f"[{name}] warm-up ...", flush=True)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        out = fn()
        sync()
        times, cpu = [], []
        for i in range(args.repeats):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            print(f"[{name}] run {i + 1}/{args.repeats}: {times[-1]:.3f} s wall, {cpu[-1]:.3f} s CPU", flush=True)
        if name == "whole":
            ref = out.astype(np.float64)
        d = np.abs(out.astype(np.float64) - ref)
        # CPU time (all threads of this process) is reported too: on a shared machine it is far
        # less disturbed by other jobs than wall time.
        res = {"times_s": times, "median_s": statistics.median(times),
               "cpu_times_s": cpu, "median_cpu_s": statistics.median(cpu),
               "mean_abs_diff_pct": 100 * d.mean() / RANGE, "max_abs_diff_pct": 100 * d.max() / RANGE}
        if dev.type == "cuda":
            res["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        res["tflops"] = flops / res["median_s"] / 1e12  # effective: whole-image FLOPs / time
        results[name] = res

    whole_t = results["whole"]["median_s"]
    whole_cpu = results["whole"]["median_cpu_s"]
    for res in results.values():
        res["time_vs_whole"] = res["median_s"] / whole_t
        res["cpu_vs_whole"] = res["median_cpu_s"] / whole_cpu
    if "monai" in results and "seamless" in results:
        m, s = results["monai"], results["seamless"]
        notes.append(f"seamless vs MONAI: {s['median_s'] / m['median_s']:.2f}x the wall time, "
                     f"{s['median_cpu_s'] / m['median_cpu_s']:.2f}x the CPU time, "
                     f"{m['mean_abs_diff_pct'] / max(s['mean_abs_diff_pct'], 1e-12):.3g}x smaller mean deviation")
    load_after = os.getloadavg()
    if dev.type == "cpu":
        notes.append("CPU shared with other jobs while measuring (load averages recorded): "
                     "absolute times are noisy; ratios from the same run are what to compare")

    report = {
        "benchmark": "engine",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(dev),
        "versions": versions(),
        "device": str(dev),
        "precision": str(_compute_dtype(dev, args.precision)).replace("torch.", ""),
        "config": {"ngf": args.ngf, "blocks": args.blocks, "size": args.size, "tile": args.tile,
                   "overlap": args.overlap, "repeats": args.repeats, "init": args.init},
        "gflop_per_image": flops / 1e9,
        "load_average_before_after": [load_before, load_after],
        "results": results,
        "notes": notes,
    }
    if args.ngf == 64 and args.blocks == 9:
        report["floor_tflop_per_2048_image"] = FLOOR_TFLOP_NGF64
        notes.append(f"ngf 64 / 9 blocks: {flops / 1e12:.2f} TFLOP per {args.size}^2 image "
                     f"(floor {FLOOR_TFLOP_NGF64} TFLOP per 2048^2); seamless reached "
                     f"{results.get('seamless', {}).get('tflops', float('nan')):.1f} TFLOP/s, "
                     f"whole image {results['whole']['tflops']:.1f} TFLOP/s")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")

    print()
    print(f"engine benchmark: {dev} {report['precision']}, ngf {args.ngf}/{args.blocks} blocks, {args.size}^2, "
          f"tile {args.tile}, overlap {args.overlap}, {flops / 1e12:.3f} TFLOP/image, init {args.init}")
    for n in notes:
        print("note:", n)
    # TFLOP/s is effective: one whole-image pass's FLOPs / time (tiling overlap does not count)
    print(f"{'method':<10} {'median s':>9} {'x whole':>8} {'CPU s':>8} {'x whole':>8} {'TFLOP/s':>8} "
          f"{'mean diff %':>12} {'max diff %':>11}")
    for name, r in results.items():
        print(f"{name:<10} {r['median_s']:>9.3f} {r['time_vs_whole']:>8.2f} {r['median_cpu_s']:>8.2f} "
              f"{r['cpu_vs_whole']:>8.2f} {r['tflops']:>8.3f} {r['mean_abs_diff_pct']:>12.2e} "
              f"{r['max_abs_diff_pct']:>11.2e}")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

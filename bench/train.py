"""Trainer benchmark: seconds per CycleGAN training step (one full G + D update).

Why: a style model takes 100k+ steps, so the step time decides whether a site can train on
its own hardware.  The reference is the classic CycleGAN PyTorch implementation (11.3 s per
step at ngf 64 / 9 blocks / 256 px / batch 1 / one channel on the project's 2-core CPU);
the goal is <= 0.8x of that on the same machine.

Alternatives are measured in the same run, interleaved step by step (so a busy machine
slows them alike), and reported as ratios:

* ``dicom-node``: the trainer's own step (:class:`dicom_node.train.cyclegan.CycleGAN`),
* ``dicom-node (channels_last)``: the same in NHWC memory format (``--compare``; the trainer
  uses it on CUDA only, where it pays),
* ``classic``: the classic implementation's step order re-created with the same networks
  (six separate generator calls, two discriminator calls per discriminator; ``--compare``).

Timings: median of ``--steps`` steps after ``--warmup`` steps, on synthetic patches.

Run: ``python bench/train.py --ngf 64 --blocks 9 --patch 256 --batch 1 --steps 3 --compare``
(GPU: ``--device cuda`` measures with and without bf16 autocast).  Prints a table, then
``{"median_step_s": ...}`` as the last line, and writes ``bench/results/train.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from machine import machine_info  # bench/ is on sys.path when run as a script
from dicom_node.train.cyclegan import CycleGAN
from dicom_node.train.losses import ImagePool

REPO = Path(__file__).resolve().parents[1]
REFERENCE_CLASSIC_S = 11.3  # classic implementation, this config, the project's 2-core CPU (DESIGN-NOTES)


class ClassicStep:
    """The classic CycleGAN step order (pytorch-CycleGAN-and-pix2pix ``optimize_parameters``)."""

    def __init__(self, model: CycleGAN, pool_size: int = 50) -> None:
        self.g_a, self.g_b = model.module("g_ab"), model.module("g_ba")
        self.d_a, self.d_b = model.module("d_b"), model.module("d_a")  # classic: D_A judges fake B
        self.opt_g, self.opt_d = model.opt_g, model.opt_d
        self.pool_a, self.pool_b = ImagePool(pool_size, 1), ImagePool(pool_size, 2)
        self.device = model.device

    @staticmethod
    def _set_requires_grad(nets: list, flag: bool) -> None:
        for net in nets:
            for p in net.parameters():
                p.requires_grad = flag

    def step(self, real_a: torch.Tensor, real_b: torch.Tensor) -> None:
        real_a, real_b = real_a.to(self.device), real_b.to(self.device)
        fake_b = self.g_a(real_a)
        rec_a = self.g_b(fake_b)
        fake_a = self.g_b(real_b)
        rec_b = self.g_a(fake_a)
        self._set_requires_grad([self.d_a, self.d_b], False)
        self.opt_g.zero_grad()
        idt_a = self.g_a(real_b)
        idt_b = self.g_b(real_a)
        pa, pb = self.d_a(fake_b), self.d_b(fake_a)
        loss_g = (F.mse_loss(pa, torch.ones_like(pa)) + F.mse_loss(pb, torch.ones_like(pb))
                  + F.l1_loss(rec_a, real_a) * 10 + F.l1_loss(rec_b, real_b) * 10
                  + F.l1_loss(idt_a, real_b) * 5 + F.l1_loss(idt_b, real_a) * 5)
        loss_g.backward()
        self.opt_g.step()
        self._set_requires_grad([self.d_a, self.d_b], True)
        self.opt_d.zero_grad()
        for d, real, fake in ((self.d_a, real_b, self.pool_b.query(fake_b)),
                              (self.d_b, real_a, self.pool_a.query(fake_a))):
            pr, pf = d(real), d(fake.detach())
            loss_d = (F.mse_loss(pr, torch.ones_like(pr)) + F.mse_loss(pf, torch.zeros_like(pf))) * 0.5
            loss_d.backward()
        self.opt_d.step()


def versions() -> dict:
    import numpy

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    try:
        from dicom_node import __version__

        out["dicom_node"] = __version__
    except ImportError:
        pass
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ngf", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=9)
    ap.add_argument("--ndf", type=int, default=64)
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (after warm-up)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true", help="bf16 autocast for the dicom-node step")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--compare", action="store_true", help="also time the classic step and the contiguous layout")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "train.json"))
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def make(channels_last: bool, amp: bool) -> CycleGAN:
        return CycleGAN(ngf=args.ngf, n_blocks=args.blocks, ndf=args.ndf, device=device, amp=amp,
                        channels_last=channels_last, seed=0)

    cl_default = device.type == "cuda"  # the trainer's channels_last "auto"
    variants: dict[str, object] = {"dicom-node" + (" bf16" if args.amp else ""): make(cl_default, args.amp)}
    if device.type == "cuda" and not args.amp:
        variants["dicom-node bf16"] = make(cl_default, True)
    if args.compare:
        variants["dicom-node (contiguous)" if cl_default else "dicom-node (channels_last)"] = make(
            not cl_default, args.amp)
        variants["classic"] = ClassicStep(make(False, False))
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, 1, args.patch, args.patch)
    batches = [(torch.rand(shape, generator=gen) * 2 - 1, torch.rand(shape, generator=gen) * 2 - 1) for _ in range(4)]
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu_times: dict[str, list[float]] = {k: [] for k in variants}  # process CPU s: less sensitive to other load
    load_before = machine_info(device).get("load_average")
    for i in range(args.warmup + args.steps):
        a, b = batches[i % len(batches)]
        for name, v in variants.items():  # interleaved: every variant sees the same machine load
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            v.step(a, b)
            sync()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if i >= args.warmup:
                times[name].append(dt)
                cpu_times[name].append(dc)
            print(f"  step {i + 1}/{args.warmup + args.steps} {name:26s} {dt:8.3f} s  cpu {dc:8.3f} s"
                  f"{'  (warm-up)' if i < args.warmup else ''}", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu_times.items()}
    main_name = next(iter(variants))
    result = {
        "benchmark": "train",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {"ngf": args.ngf, "n_blocks": args.blocks, "ndf": args.ndf, "patch": args.patch,
                   "batch": args.batch, "device": str(device), "amp": args.amp, "steps": args.steps,
                   "warmup": args.warmup},
        "median_step_s": med[main_name],
        "variants": {k: {"median_step_s": med[k], "steps_per_s": 1.0 / med[k], "times_s": times[k],
                         "median_cpu_s": cpu_med[k], "cpu_times_s": cpu_times[k]} for k in times},
        "reference_classic_s": REFERENCE_CLASSIC_S,
        "ratio_vs_reference": med[main_name] / REFERENCE_CLASSIC_S,
        "machine": {**machine_info(device), "load_average_before": load_before},
        "versions": versions(),
        "note": args.note,
    }
    if "classic" in med:
        result["ratio_vs_classic_same_run"] = med[main_name] / med["classic"]
        result["cpu_ratio_vs_classic_same_run"] = cpu_med[main_name] / cpu_med["classic"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nCycleGAN training step, ngf {args.ngf} / {args.blocks} blocks / patch {args.patch} / batch {args.batch}"
          f" on {device} ({result['machine']['cpu'] if device.type == 'cpu' else result['machine']['gpu']})")
    print(f"{'variant':28s} {'median s/step':>14s} {'steps/s':>9s} {'vs classic':>11s} {'CPU s/step':>11s} "
          f"{'CPU vs classic':>15s}")
    for k in times:
        ratio = f"{med[k] / med['classic']:.2f}x" if "classic" in med else "-"
        cratio = f"{cpu_med[k] / cpu_med['classic']:.2f}x" if "classic" in med else "-"
        print(f"{k:28s} {med[k]:14.3f} {1 / med[k]:9.3f} {ratio:>11s} {cpu_med[k]:11.3f} {cratio:>15s}")
    print(f"reference classic (DESIGN-NOTES, idle machine): {REFERENCE_CLASSIC_S} s/step; "
          f"dicom-node / reference = {result['ratio_vs_reference']:.2f}x")
    print(json.dumps({"median_step_s": round(med[main_name], 4)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Trainer benchmark: seconds per CycleGAN training step (one full G + D update).

Why: a style model takes 100k+ steps, so the step time decides whether a site can train on
its own hardware.  The goal is <= 0.8x of the reference CycleGAN implementation
(junyanz/pytorch-CycleGAN-and-pix2pix) on the same machine, at ngf 64 / 9 blocks / 256 px /
batch 1 / one channel.

The reference is the real code, not a re-creation: ``--reference PATH`` names a checkout of
that repository (default ``/work/ref/cyclegan`` when it exists; nothing of it lives in this
repository).  Its ``CycleGANModel`` is built from an options namespace (resnet_{6,9}blocks,
basic 70x70 PatchGAN, instance norm, no dropout, lsgan, pool 50, Adam 2e-4 / 0.5, lambda 10 /
identity 0.5, input_nc = output_nc = 1), ``setup()`` initialises it, and each step is
``set_input`` + ``optimize_parameters`` as its train.py does.  Without a checkout the
reference is skipped with a note and only dicom-node variants are timed.

Variants, all in the same run, interleaved step by step (a busy machine slows them alike):

* ``reference``: the reference implementation (fp32, contiguous, as it ships),
* ``dicom-node fp32`` / ``fp32 NHWC``: the trainer's step
  (:class:`dicom_node.train.cyclegan.CycleGAN`) in float32, contiguous / channels_last,
* ``dicom-node bf16`` / ``bf16 NHWC``: the same under bf16 autocast (``amp=True``),
* ``dicom-node fp32 onednn-bf16``: float32 tensors with oneDNN's implicit bf16 convolutions
  (``torch.backends.mkldnn.conv.fp32_precision = "bf16"``; set only around that variant's step;
  on the AMD EPYC with avx512_bf16 it changed nothing: bit-identical outputs, same time),
* ``--classic``: the classic step order re-created with dicom-node's networks (historical),
* ``--threads-compare``: the reference and dicom-node fp32 / bf16 with one torch thread,
* ``--first-stages``: the default recipe's residual generators with each kind of tone filter in
  front (one gain per band, band curves, band curves per brightness bin), fp32.

The variant ``train.amp: auto`` / ``train.channels_last: auto`` pick on this machine
(:func:`dicom_node.train.cpu_speed.cpu_fast_settings`) is marked ``*`` and is the headline
``median_step_s``.  Every dicom-node variant starts from the same seed and sees the same
batches, so their per-step losses are recorded and the generator loss compared with the fp32
variant's (largest relative difference over the steps run).

Timings: median of ``--steps`` steps after ``--warmup`` steps, on synthetic patches.

Run: ``python bench/train.py`` (ngf 64 / 9 blocks / 256 px, 2 warm-up + 3 timed steps,
~6 min on a 2-core CPU); ``--quick`` for ngf 16 / 6 blocks / 128 px.  GPU: ``--device cuda``.
Prints a table, then ``{"median_step_s": ...}`` as the last line, and writes
``bench/results/train.json``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from machine import machine_info  # bench/ is on sys.path when run as a script

from dicom_node.engine.tone_filter import DEFAULT_BRIGHTNESS_BINS
from dicom_node.train.cpu_speed import cpu_fast_settings, cpu_features
from dicom_node.train.cyclegan import CycleGAN
from dicom_node.train.losses import ImagePool
from dicom_node.train.networks import tone_filter_arguments

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE = Path("/work/ref/cyclegan")


class ReferenceStep:
    """The reference CycleGAN (junyanz/pytorch-CycleGAN-and-pix2pix) driven as its train.py does."""

    def __init__(self, path: Path, *, ngf: int, n_blocks: int, ndf: int, patch: int, batch: int,
                 device: torch.device, pool_size: int = 50, seed: int = 0) -> None:
        if n_blocks not in (6, 9):
            raise ValueError(f"the reference has resnet_6blocks and resnet_9blocks only, not {n_blocks}")
        sys.path.insert(0, str(path))
        try:
            from models.cycle_gan_model import CycleGANModel  # the reference's own module
        finally:
            sys.path.remove(str(path))
        self.module_file = sys.modules["models.cycle_gan_model"].__file__
        self.tmp = tempfile.TemporaryDirectory(prefix="cyclegan-ref-")
        opt = SimpleNamespace(
            isTrain=True, checkpoints_dir=self.tmp.name, name="bench", device=device, preprocess="crop",
            input_nc=1, output_nc=1, ngf=ngf, ndf=ndf, netG=f"resnet_{n_blocks}blocks", netD="basic",
            n_layers_D=3, norm="instance", no_dropout=True, init_type="normal", init_gain=0.02,
            lambda_A=10.0, lambda_B=10.0, lambda_identity=0.5, pool_size=pool_size, gan_mode="lsgan",
            lr=0.0002, beta1=0.5, direction="AtoB", continue_train=False, load_iter=0, epoch="latest",
            verbose=False, lr_policy="linear", epoch_count=1, n_epochs=100, n_epochs_decay=100,
            lr_decay_iters=50, batch_size=batch, crop_size=patch, load_size=patch)
        torch.manual_seed(seed)
        random.seed(seed)  # its ImagePool draws from the global RNG
        with contextlib.redirect_stdout(sys.stderr):  # it prints its init and parameter counts
            self.model = CycleGANModel(opt)
            self.model.setup(opt)

    def step(self, real_a: torch.Tensor, real_b: torch.Tensor) -> dict[str, float]:
        m = self.model
        m.set_input({"A": real_a, "B": real_b, "A_paths": [""] * len(real_a), "B_paths": [""] * len(real_b)})
        m.optimize_parameters()
        return {"g_total": float(m.loss_G.detach()), "d_a": float(m.loss_D_B.detach()), "d_b": float(m.loss_D_A.detach())}


class DicomNodeStep:
    """dicom-node's trainer step (amp / channels_last are the model's own settings)."""

    def __init__(self, model: CycleGAN) -> None:
        self.model = model

    def step(self, real_a: torch.Tensor, real_b: torch.Tensor) -> dict[str, float]:
        return {k: float(v) for k, v in self.model.step(real_a, real_b).items()}


class WithSettings:
    """Another step with process-wide settings changed only around it (threads, oneDNN precision)."""

    def __init__(self, inner: object, *, threads: int = 0, onednn_bf16: bool = False) -> None:
        self.inner, self.threads, self.onednn_bf16 = inner, threads, onednn_bf16

    def step(self, real_a: torch.Tensor, real_b: torch.Tensor) -> dict[str, float]:
        conv = torch.backends.mkldnn.conv
        old_prec, old_threads = conv.fp32_precision, torch.get_num_threads()
        if self.onednn_bf16:
            conv.fp32_precision = "bf16"
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            return self.inner.step(real_a, real_b)
        finally:
            conv.fp32_precision = old_prec
            torch.set_num_threads(old_threads)


class ClassicStep:
    """The classic step order re-created with dicom-node's networks (six generator calls)."""

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

    def step(self, real_a: torch.Tensor, real_b: torch.Tensor) -> dict[str, float]:
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
        d_losses = []
        for d, real, fake in ((self.d_a, real_b, self.pool_b.query(fake_b)),
                              (self.d_b, real_a, self.pool_a.query(fake_a))):
            pr, pf = d(real), d(fake.detach())
            loss_d = (F.mse_loss(pr, torch.ones_like(pr)) + F.mse_loss(pf, torch.zeros_like(pf))) * 0.5
            loss_d.backward()
            d_losses.append(float(loss_d))
        self.opt_d.step()
        return {"g_total": float(loss_g), "d_a": d_losses[1], "d_b": d_losses[0]}


# --first-stages: the tone filter in front of the generators, as model.band_curves,
# model.brightness_bins and model.local_tone_bins build it (train/networks.py)
FIRST_STAGES = {"gains": tone_filter_arguments(True, False), "curves": tone_filter_arguments(True, True, 1),
                "curves x4 bins": tone_filter_arguments(True, True, DEFAULT_BRIGHTNESS_BINS),
                "curves x4 bins + local x8": tone_filter_arguments(True, True, DEFAULT_BRIGHTNESS_BINS, 8)}


def _not_identity(tone_filter: torch.nn.Module) -> None:
    """Curves and gains away from the identity (which the filter skips), as after a fit."""
    with torch.no_grad():
        tone_filter.gains.mul_(1.3)
        if tone_filter.band_curves:
            tone_filter.band_y.mul_(torch.linspace(1.6, 0.7, tone_filter.band_y.shape[-1]))


def versions() -> dict:
    import numpy

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
           "onednn": torch.backends.mkldnn.is_available(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        from dicom_node import __version__

        out["dicom_node"] = __version__
    except ImportError:
        pass
    return out


def reference_commit(path: Path) -> str | None:
    for name in ("REF_COMMIT", ".git/HEAD"):
        f = path / name
        if f.is_file():
            return f.read_text().strip()
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ngf", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=9)
    ap.add_argument("--ndf", type=int, default=64)
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="ngf 16 / 6 blocks / patch 128 (overrides those flags)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (after warm-up)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reference", default=None,
                    help=f"checkout of junyanz/pytorch-CycleGAN-and-pix2pix (default {DEFAULT_REFERENCE} if present)")
    ap.add_argument("--first-stages", action="store_true",
                    help="also time residual generators with each kind of tone filter in front")
    ap.add_argument("--variants", default="",
                    help="comma-separated subset of variant names to run (default: all that apply)")
    ap.add_argument("--classic", action="store_true", help="also time the classic step order re-created")
    ap.add_argument("--threads-compare", action="store_true", help="also time dicom-node fp32 with 1 thread")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "train.json"))
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    args = ap.parse_args()
    if args.quick:
        args.ngf, args.blocks, args.ndf, args.patch = 16, 6, 64, 128
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def make(amp: bool, channels_last: bool) -> CycleGAN:
        return CycleGAN(ngf=args.ngf, n_blocks=args.blocks, ndf=args.ndf, device=device, amp=amp,
                        channels_last=channels_last, seed=0)

    notes: list[str] = []
    variants: dict[str, object] = {}
    ref_path = Path(args.reference) if args.reference else (DEFAULT_REFERENCE if DEFAULT_REFERENCE.is_dir() else None)
    ref_info: dict = {"path": str(ref_path) if ref_path else None}
    if ref_path is None or not ref_path.is_dir():
        notes.append(f"reference skipped: no checkout at {ref_path or DEFAULT_REFERENCE} (pass --reference PATH)")
    else:
        try:
            def make_ref() -> ReferenceStep:
                return ReferenceStep(ref_path, ngf=args.ngf, n_blocks=args.blocks, ndf=args.ndf,
                                     patch=args.patch, batch=args.batch, device=device)

            variants["reference"] = make_ref()
            ref_info.update(commit=reference_commit(ref_path), module=variants["reference"].module_file)
            if cpu and args.threads_compare:
                variants["reference 1 thread"] = WithSettings(make_ref(), threads=1)
        except Exception as exc:  # report, keep timing dicom-node
            notes.append(f"reference skipped: {type(exc).__name__}: {exc}")
    combos = [(False, False), (False, True), (True, False), (True, True)]
    for amp, cl in combos:
        variants[f"dicom-node {'bf16' if amp else 'fp32'}{' NHWC' if cl else ''}"] = DicomNodeStep(make(amp, cl))
    if cpu:
        variants["dicom-node fp32 onednn-bf16"] = WithSettings(DicomNodeStep(make(False, False)), onednn_bf16=True)
        if args.threads_compare:
            variants["dicom-node fp32 1 thread"] = WithSettings(DicomNodeStep(make(False, False)), threads=1)
            variants["dicom-node bf16 1 thread"] = WithSettings(DicomNodeStep(make(True, False)), threads=1)
    if args.first_stages:  # the default recipe's generators: residual, a fitted-looking tone filter in front
        for label, tone in FIRST_STAGES.items():
            model = CycleGAN(ngf=args.ngf, n_blocks=args.blocks, ndf=args.ndf, device=device, amp=False,
                             channels_last=False, seed=0, residual=True, tone_filter=tone)
            for name in ("g_ab", "g_ba"):
                _not_identity(model.module(name).tone_filter)
            variants[f"fp32 residual + {label}"] = DicomNodeStep(model)
    if args.classic:
        variants["classic (re-created)"] = ClassicStep(make(False, False))
    if args.variants:
        keep = {v.strip() for v in args.variants.split(",")}
        variants = {k: v for k, v in variants.items() if k in keep}
    if cpu:
        auto = cpu_fast_settings()
    else:
        auto = {"amp": device.type == "cuda", "channels_last": device.type == "cuda"}
    auto_name = f"dicom-node {'bf16' if auto['amp'] else 'fp32'}{' NHWC' if auto['channels_last'] else ''}"

    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, 1, args.patch, args.patch)
    batches = [(torch.rand(shape, generator=gen) * 2 - 1, torch.rand(shape, generator=gen) * 2 - 1) for _ in range(4)]
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu_times: dict[str, list[float]] = {k: [] for k in variants}  # process CPU s: less sensitive to other load
    losses: dict[str, list[dict]] = {k: [] for k in variants}
    load_before = machine_info(device).get("load_average")
    t_start = time.perf_counter()
    for i in range(args.warmup + args.steps):
        a, b = batches[i % len(batches)]
        for name, v in variants.items():  # interleaved: every variant sees the same machine load
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            step_losses = v.step(a.clone(), b.clone())
            sync()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            losses[name].append(step_losses)
            if i >= args.warmup:
                times[name].append(dt)
                cpu_times[name].append(dc)
            print(f"  step {i + 1}/{args.warmup + args.steps} {name:28s} {dt:8.3f} s  cpu {dc:8.3f} s"
                  f"  G {step_losses['g_total']:.4f}{'  (warm-up)' if i < args.warmup else ''}",
                  file=sys.stderr, flush=True)
    total_s = time.perf_counter() - t_start
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu_times.items()}
    ref = med.get("reference")
    cpu_ref = cpu_med.get("reference")
    main_name = auto_name if auto_name in med else next(n for n in med if n != "reference")

    # bf16 numerics: per-step losses of every dicom-node variant against the fp32 one (same seed and data)
    loss_dev: dict[str, float] = {}
    base = losses.get("dicom-node fp32")
    if base:
        for k, ls in losses.items():
            if k.startswith("dicom-node") and k != "dicom-node fp32":
                loss_dev[k] = max(abs(x["g_total"] - y["g_total"]) / max(abs(y["g_total"]), 1e-6)
                                  for x, y in zip(ls, base))

    result = {
        "benchmark": "train",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {"ngf": args.ngf, "n_blocks": args.blocks, "ndf": args.ndf, "patch": args.patch,
                   "batch": args.batch, "channels": 1, "device": str(device), "steps": args.steps,
                   "warmup": args.warmup, "threads": torch.get_num_threads()},
        "auto_settings": auto,
        "auto_variant": main_name,
        "cpu_features": cpu_features() if cpu else None,
        "median_step_s": med[main_name],
        "reference": {**ref_info, "median_step_s": ref},
        "ratio_vs_reference": med[main_name] / ref if ref else None,
        "variants": {k: {"median_step_s": med[k], "steps_per_s": 1.0 / med[k], "times_s": times[k],
                         "median_cpu_s": cpu_med[k], "cpu_times_s": cpu_times[k],
                         "ratio_vs_reference": med[k] / ref if ref else None,
                         "cpu_ratio_vs_reference": cpu_med[k] / cpu_ref if cpu_ref else None,
                         "losses": losses[k],
                         "max_rel_g_loss_deviation_vs_fp32": loss_dev.get(k)} for k in times},
        "total_wall_s": total_s,
        "machine": {**machine_info(device), "load_average_before": load_before},
        "versions": versions(),
        "notes": notes,
        "note": args.note,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    for n in notes:
        print(f"note: {n}")
    print(f"\nCycleGAN training step, ngf {args.ngf} / {args.blocks} blocks / ndf {args.ndf} / patch {args.patch}"
          f" / batch {args.batch} / 1 channel on {device} "
          f"({result['machine']['cpu'] if cpu else result['machine']['gpu']}, {torch.get_num_threads()} threads)")
    print(f"{'variant':30s} {'median s/step':>14s} {'vs reference':>13s} {'CPU s/step':>11s} {'CPU vs ref':>11s} "
          f"{'G loss dev vs fp32':>19s}")
    for k in times:
        ratio = f"{med[k] / ref:.2f}x" if ref else "-"
        cratio = f"{cpu_med[k] / cpu_ref:.2f}x" if cpu_ref else "-"
        dev = f"{loss_dev[k]:.2%}" if k in loss_dev else "-"
        mark = " *" if k == main_name else ""
        print(f"{k + mark:30s} {med[k]:14.3f} {ratio:>13s} {cpu_med[k]:11.3f} {cratio:>11s} {dev:>19s}")
    print(f"* = train.amp/channels_last 'auto' on this machine: {auto}")
    print(json.dumps({"median_step_s": round(med[main_name], 4)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

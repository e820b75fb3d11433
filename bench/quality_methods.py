"""The methods ``bench/quality.py`` scores: the lookups (histogram, tone filter alone) made
from the training domains, and the trained ones run through ``dicom-node train`` (or the
reference CycleGAN implementation), each turned into a function of one model-space image.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def histogram_lut(a_arrays: list[np.ndarray], b_arrays: list[np.ndarray]):
    q = np.linspace(0, 1, 1025)
    xs = np.quantile(np.concatenate([x.ravel() for x in a_arrays]), q) + np.arange(q.size) * 1e-9
    ys = np.quantile(np.concatenate([x.ravel() for x in b_arrays]), q)
    return lambda img: np.interp(img, xs, ys).astype(np.float32)


def tone_filter_only(a_arrays, b_arrays, seed: int, band_curves: bool = True, brightness_bins: int | None = None,
                     local_bins: int = 1):
    """The first stage as ``dicom-node train`` fits it (its defaults unless told otherwise)."""
    import torch

    from dicom_node.engine.tone_filter import DEFAULT_BRIGHTNESS_BINS
    from dicom_node.train.tone_fit import fit_tone_filter

    bins = DEFAULT_BRIGHTNESS_BINS if brightness_bins is None else brightness_bins
    tf = fit_tone_filter(a_arrays, b_arrays, band_curves=band_curves, brightness_bins=bins, local_bins=local_bins,
                         seed=seed)

    def run(img: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return tf(torch.from_numpy(img)[None, None])[0, 0].numpy()
    return run


def train_config(method: str, data: Path, run_dir: Path, args: argparse.Namespace, seed: int) -> dict:
    budget = {"patch_size": args.patch, "batch_size": args.batch, "steps": args.steps, "seed": seed,
              "device": args.device, "threads": args.threads}
    every = max(1, args.steps // max(1, args.checkpoints))
    cfg = {"data": {"a": str(data / "A"), "b": str(data / "B")},
           "model": {"ngf": args.ngf, "n_blocks": args.blocks, "ndf": args.ndf},
           "train": budget,
           "output": {"dir": str(run_dir), "sample_every": args.steps, "checkpoint_every": every,
                      "log_every": max(1, args.steps // 10)}}
    if getattr(args, "local_tone_bins", 1) > 1 and method != "classic":  # bench/quality.py --local-tone-bins
        cfg["model"]["local_tone_bins"] = args.local_tone_bins
    if getattr(args, "normalization", None):  # bench/fidelity_faults.py: images normalised each on its own
        cfg["data"]["normalization"] = args.normalization
    if method == "default":  # selected as without pairs (bench/selection.py)
        cfg["train"]["select_by"] = getattr(args, "select_by", "distribution")
        if getattr(args, "val_half", False):  # half of the test pairs, which choose the tone detail
            cfg["data"]["val"] = str(val_half(data))
        # else no data.val: validation pairs choose the first stage's tone detail (train/tone_fit.py),
        # so the test pairs would choose what they score; the checkpoints are scored afterwards.
    if method in ("default", "paired"):  # bench/quality.py --set train.KEY=VALUE: a setting to measure
        import yaml

        for item in getattr(args, "set", None) or []:
            dotted, _, value = item.partition("=")
            section, _, key = dotted.partition(".")
            cfg.setdefault(section, {})[key] = yaml.safe_load(value)
    if method == "paired":  # the ceiling: data_paired() holds true training pairs of the same styles
        cfg["train"].update(paired="on")
    if method == "classic":
        cfg["model"].update(residual=False, tone_filter=False)
        cfg["train"].update(lambda_identity=0.5, decay_from=args.steps)
    return cfg


def val_half(data: Path) -> Path:
    """``data/val-half``: the first half of ``data/test``'s true pairs (``--val-half``), so that what
    the trainer reads from its validation pairs is scored on pairs it never saw."""
    import shutil

    from dicom_node.train.data import find_image_files

    out = data / "val-half"
    for side in ("A", "B"):
        files = find_image_files(data / "test" / side)
        (out / side).mkdir(parents=True, exist_ok=True)
        for f in files[:len(files) // 2]:
            shutil.copy2(f, out / side / f.name)
    return out


def run_trainer(method: str, data: Path, work: Path, args: argparse.Namespace, seed: int) -> Path:
    import yaml

    run_dir = work / f"{method}-seed{seed}"
    model = run_dir / "models" / f"{run_dir.name}_A2B.safetensors"
    if model.exists() and not args.retrain:
        return model
    if args.no_train:  # scoring pass: another process may still be training this run
        deadline = time.monotonic() + 3600
        while not model.exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"--no-train: {model} did not appear within an hour")
            time.sleep(10)
        return model
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cfg_path = run_dir.parent / f"{run_dir.name}.yaml"
    cfg_path.write_text(yaml.safe_dump(train_config(method, data, run_dir, args, seed)))
    cmd = [sys.executable, "-m", "dicom_node", "train", "--config", str(cfg_path), "--no-progress"]
    t0 = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    print(f"  trained {method} seed {seed} in {time.perf_counter() - t0:.0f} s", flush=True)
    return model


def load_generators(path: Path | dict):
    """(G_ab, G_ba) of a checkpoint file (or its loaded payload), as trained, in eval mode."""
    from dicom_node.engine.model_file import generator_from_architecture
    from dicom_node.train.export import load_checkpoint

    payload = path if isinstance(path, dict) else load_checkpoint(path)
    out = []
    for key in ("g_ab", "g_ba"):
        gen = generator_from_architecture(payload["meta"]["architecture"])
        gen.load_state_dict(payload["state"][key])
        out.append(gen.eval())
    return out


def checkpoint_fn(run_dir: Path, device: str, *, best: bool = False, path: Path | dict | None = None):
    """A->B of a run's newest (or best, or that ``path``, or that loaded payload) checkpoint as trained: its network,
    whatever the export decided.  The paired ceiling is what the network learned with the answer;
    ``default_network`` shows what the export's fallback to the tone filter kept out."""
    from dicom_node.engine import translate
    from dicom_node.engine.model_file import StyleModel
    from dicom_node.train.export import best_checkpoint_path, latest_checkpoint

    g_ab, _ = load_generators(path or (best_checkpoint_path(run_dir) if best else latest_checkpoint(run_dir)))
    model = StyleModel(generator=g_ab, metadata={"name": "checkpoint"})
    return lambda img: translate(model, img, device=device)


def engine_fn(model_path: Path, device: str):
    from dicom_node.engine import load_style_model, translate

    model = load_style_model(model_path)
    return lambda img: translate(model, img, device=device)


def train_reference(data: Path, work: Path, args: argparse.Namespace, seed: int) -> Path:
    """Train the reference implementation itself via bench/reference_cyclegan.py (same budget)."""
    script = Path(__file__).resolve().parent / "reference_cyclegan.py"
    out = work / f"reference-seed{seed}.pt"
    if not out.exists() or args.retrain:
        cmd = [sys.executable, str(script), "--reference", str(args.reference), "--data", str(data),
               "--out", str(out), "--steps", str(args.steps), "--ngf", str(args.ngf), "--blocks", str(args.blocks),
               "--ndf", str(args.ndf), "--patch", str(args.patch), "--seed", str(seed)]
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
        t0 = time.perf_counter()
        with open(work / f"reference-seed{seed}.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
        print(f"  trained reference seed {seed} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def reference_fn(data: Path, work: Path, args: argparse.Namespace, seed: int):
    """The reference's A->B generator, as trained by :func:`train_reference`."""
    out = train_reference(data, work, args, seed)
    import torch

    sys.path.insert(0, str(args.reference))
    from models import networks  # type: ignore  # the reference's own module

    net = networks.define_G(1, 1, args.ngf, f"resnet_{args.blocks}blocks", "instance", False, "normal", 0.02)
    net.load_state_dict(torch.load(out, map_location="cpu", weights_only=True))
    net.eval()

    def run(img: np.ndarray) -> np.ndarray:
        h, w = img.shape
        x = torch.from_numpy(np.pad(img, ((0, -h % 4), (0, -w % 4)), mode="reflect"))[None, None]
        with torch.no_grad():
            return net(x)[0, 0, :h, :w].numpy()
    return run

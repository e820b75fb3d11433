"""Unpaired style-learning quality: every method at the same budget, several seeds and style pairs.

Why: a style model trained from unpaired images must beat the two things a site gets for free:
returning the input (identity) and a global histogram lookup.  This benchmark trains on
``dicom-node demo-data --unpaired`` data (A and B from disjoint phantoms) and scores on the
held-out true pairs in ``test/``, for each style pair and seed:

* ``identity``: the input unchanged;
* ``histogram``: global histogram matching of A's intensities onto B's (training domains);
* ``tone_filter``: the trainer's fitted tone filter alone (no network): the first stage that
  every trained model must beat (the trainer exports it alone when its network does not); with
  band curves per brightness bin (band gains that depend on the amplitude and the local
  brightness, ``model.band_curves`` and ``model.brightness_bins``, the defaults);
* ``tone_curves``: the same stage with one band curve per band (``model.brightness_bins: 1``),
  and ``tone_gains`` with one gain per band (``model.band_curves: false``), the first stages
  before, to show what each step adds in the same run;
* ``classic``: the classic CycleGAN recipe through ``dicom-node train`` (no residual, no
  tone filter, identity loss 0.5, constant learning rate);
* ``default``: ``dicom-node train`` with its default config (only the budget set);
* ``reference``: the reference CycleGAN implementation itself (``--reference PATH``, a
  checkout outside this repository; skipped when absent);
* ``default_network``: the ``default`` run's best checkpoint with its network kept, i.e. before
  the export's fallback to the tone filter (what that fallback kept out, or let through);
* ``paired``: the paired-supervised ceiling: ``dicom-node train`` with the same network and
  budget on *true pairs* of the same style pair (``paired: on``), its newest checkpoint's
  network as trained: what the network could learn if it were told the answer.  Per method, ``gap_closed`` is the share of the gap between the
  tone filter and this ceiling that it closes.

Style pairs are ``NAME`` (procedural phantoms) or ``NAME@real`` (crops of varying field of
view of pydicom-data's real CR radiographs, ``demo-data --source real``): the nonlinear pairs
(multiscale, clahe, denoise, unsharp, combined) model vendor processing, the linear ones
(classic, edges, noise) check that nothing got worse.  Images are read as the trainer reads
them: each domain through its own fixed window (``train/intensity.py``).

Unpaired checkpoint selection (``train/selection.py``): the ``default`` runs keep the test
pairs as monitored validation (``data.val``) but select as without them (``select_by:
distribution``, the unpaired default), so each checkpoint has both its unpaired gain and its
true-pair PSNR; ``selection`` reports their Spearman rank correlation over every checkpoint of
every run of a pair (``bench/selection.py`` compares the criteria on the stored checkpoints).

Score: PSNR and SSIM of A->B on every held-out pair after a least-squares gain/offset fit of the
output onto the true target ("affine", so a normalisation difference does not count; also
recorded as written, ``psnr_as_written``: what the node sends, in B's window), in model
space (data range 2).  Per method: mean over images, and the worst image's margin over its own
identity score.

``--local-tone-bins 8`` turns on the first stage's local tone curves (``model.local_tone_bins``)
for ``tone_filter`` and the trained methods (``classic`` has no first stage); without it the
trained methods run the trainer's default (``auto``: on with ``--val-half``).  The trainer keeps
them only where its validation pairs show a gain; with them it also chooses how many quantiles
its tone curves match and fits their output level (``train/tone_fit.py``).  The ``default`` runs
get validation pairs only with ``--val-half``: the first half of the test pairs as ``data.val``,
every method then scored on the second half only, so nothing a run read from its pairs is
scored on them.

Budget (defaults as in issue 10): ngf 16, 6 blocks, ndf 16, patch 128, batch 1, 1500 steps,
CPU.  Prints a table last and writes ``bench/results/quality.json`` with the raw numbers.
``--steps 200 --pairs classic --seeds 0`` is a quick smoke run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402
from quality_methods import (  # noqa: E402  (bench/ is on sys.path when run as a script)
    checkpoint_fn,
    engine_fn,
    histogram_lut,
    reference_fn,
    run_trainer,
    tone_filter_only,
    train_reference,
)

RESULTS = Path(__file__).resolve().parent / "results"
DATA_RANGE = 2.0  # model space [-1, 1]
# the first stage alone, as fitted by dicom-node train: its default, and the versions before it
FIRST_STAGES = {"tone_filter": {}, "tone_curves": {"brightness_bins": 1}, "tone_gains": {"band_curves": False}}
ALL_METHODS = ("identity", "histogram", "tone_gains", "tone_curves", "tone_filter", "classic", "default", "default_network", "paired", "reference")
TRAINED = ("classic", "default", "paired")


# ----------------------------------------------------------------------------- scoring

def affine_fit(out: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``out`` after the least-squares gain and offset that best match ``target``."""
    x = out.astype(np.float64).ravel()
    y = target.astype(np.float64).ravel()
    xm, ym = x.mean(), y.mean()
    var = ((x - xm) ** 2).mean()
    gain = ((x - xm) * (y - ym)).mean() / var if var > 0 else 0.0
    return (gain * (out.astype(np.float64) - xm) + ym).astype(np.float32)


def affine_scores(out: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    from dicom_node.evaluation import psnr, ssim

    fitted = affine_fit(out, target)
    return psnr(fitted, target, DATA_RANGE), ssim(fitted, target, DATA_RANGE)


def stage_scores(tf, pairs) -> tuple[list[float], list[float]]:
    """Per (source, target) pair, a first stage's output (clamped as the generator clamps; ``tf``
    None: the source itself) scored in look (affine PSNR) and as written (plain PSNR, what the node sends)."""
    import torch

    from dicom_node.evaluation import psnr

    with torch.no_grad():
        outs = [x if tf is None else tf(torch.from_numpy(x)[None, None])[0, 0].clamp(-1, 1).numpy() for x, _ in pairs]
    return ([affine_scores(o, y)[0] for o, (_, y) in zip(outs, pairs)],
            [psnr(np.asarray(o, np.float64), np.asarray(y, np.float64), DATA_RANGE) for o, (_, y) in zip(outs, pairs)])


def domain_windows(data: Path) -> dict[str, dict]:
    """Each training domain's fixed window, measured as ``dicom-node train`` measures it."""
    from dicom_node.train.intensity import run_normalizations

    a, b = run_normalizations("domain", data / "A", data / "B", data / ".windows")
    return {"A": a, "B": b}


def load_test_pairs(data: Path, norms: dict[str, dict]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    from dicom_node.train.data import load_pairs

    return load_pairs(data / "test", norms["A"], norms["B"], limit=1000)


def load_domain_arrays(folder: Path, norm: dict) -> list[np.ndarray]:
    from dicom_node.engine.pixels import normalize, read_image_file
    from dicom_node.train.data import find_image_files

    return [np.asarray(normalize(read_image_file(f), norm), np.float32) for f in find_image_files(folder)]


def score(translate_fn, pairs, style_ref=None) -> dict:
    """Affine PSNR/SSIM on the held-out pairs; with ``style_ref`` = (A training images, B's
    StyleStats) also the style distance of G(A) from B, which needs no pairs."""
    from dicom_node.evaluation import psnr

    rows = []
    for name, a, b in pairs:
        out_a = translate_fn(a)
        p, s = affine_scores(out_a, b)
        pi, si = affine_scores(a, b)
        rows.append({"image": name, "psnr": p, "ssim": s, "identity_psnr": pi, "identity_ssim": si,
                     "psnr_as_written": psnr(np.asarray(out_a, np.float64), np.asarray(b, np.float64), DATA_RANGE)})
    out = {"images": rows, "psnr": float(np.mean([r["psnr"] for r in rows])),
           "ssim": float(np.mean([r["ssim"] for r in rows])),
           "psnr_as_written": float(np.mean([r["psnr_as_written"] for r in rows])),
           "worst_margin_db": float(min(r["psnr"] - r["identity_psnr"] for r in rows))}
    if style_ref is not None:
        from dicom_node.engine.style_stats import style_distance, style_statistics

        a_images, b_stats = style_ref
        out["style_distance"] = style_distance(style_statistics([translate_fn(a) for a in a_images]), b_stats)
    return out


# ----------------------------------------------------------------------------- driver

def add_data_arguments(ap: argparse.ArgumentParser) -> None:
    """The demo-data arguments :func:`make_data` reads (``--size``, ``--count``, ``--test-count``,
    ``--data-seed``), for every script that shares its data folders."""
    ap.add_argument("--size", type=int, default=512, help="demo image side (default 512)")
    ap.add_argument("--count", type=int, default=12, help="training images per domain")
    ap.add_argument("--test-count", type=int, default=6)
    ap.add_argument("--data-seed", type=int, default=0)


def make_data(pair: str, work: Path, args: argparse.Namespace, *, paired: bool = False) -> Path:
    """``demo-data`` for ``pair`` (``NAME`` or ``NAME@real``): unpaired domains with true test
    pairs, or (``paired``) true training pairs of the same styles for the paired ceiling."""
    from dicom_node.demo.writer import write_demo_data

    style, _, source = pair.partition("@")
    data = work / f"data-{pair}{'-paired' if paired else ''}"
    if not (data / "manifest.json").exists():
        write_demo_data(data, count=args.count, test_count=0 if paired else args.test_count, size=args.size,
                        seed=args.data_seed + (1000 if paired else 0), unpaired=not paired, style_pair=style,
                        source=source or "phantom")
    return data


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def selection_check(work: Path, seeds: list[int], test: list, device: str) -> dict:
    """How the ``default`` runs' criterion (their network's gain over the first stage: the
    validation pairs' with ``--val-half``, else the band distribution's) ranks their checkpoints
    against the PSNR of each checkpoint's network on the held-out ``test`` pairs, as written
    (``test_psnr``: plain PSNR, mean, as the trainer scores ``val_psnr_a2b``) and in look
    (``test_look``: after each image's best gain and offset).  Only the checkpoints still on disk (the
    newest few and the best) can be scored; with ``--val-half`` the validation pairs' own PSNR
    (``val_psnr``, from metrics.csv) is kept beside it, but a criterion measured on the pairs it
    is ranked against would rank them by construction, so it is not what the Spearman uses."""
    import csv

    from dicom_node.train.export import best_checkpoint_path, list_checkpoints, load_checkpoint

    gains, psnrs, looks, runs, criteria = [], [], [], {}, set()
    for seed in seeds:
        run_dir = work / f"default-seed{seed}"
        path = run_dir / "metrics.csv"
        if not path.exists():
            continue
        with open(path, newline="") as f:
            val = {int(r["step"]): float(r["val_psnr_a2b"]) for r in csv.DictReader(f)
                   if r.get("gain_a2b") and r.get("val_psnr_a2b")}
        criteria.add("validation pairs" if val else "band distribution")
        kept = dict(list_checkpoints(run_dir))
        best = best_checkpoint_path(run_dir)
        found = []
        for ckpt in sorted({*kept.values(), *([best] if best.exists() else [])}):
            payload = load_checkpoint(ckpt)
            step = int(payload["step"])
            if any(r["step"] == step for r in found):
                continue  # best.pt is also one of the newest
            scored = score(checkpoint_fn(run_dir, device, path=payload), test)
            row = {"step": step, "gain_db": float(payload["meta"]["validation"]["gain_a2b"]),
                   "test_psnr": scored["psnr_as_written"], "test_look": scored["psnr"]}
            if step in val:
                row["val_psnr"] = val[step]
            found.append(row)
        runs[str(seed)] = sorted(found, key=lambda r: r["step"])
        gains += [r["gain_db"] for r in found]
        psnrs += [r["test_psnr"] for r in found]
        looks += [r["test_look"] for r in found]
    out: dict = {"checkpoints": len(gains), "criterion": " and ".join(sorted(criteria)), "runs": runs}
    if len(gains) >= 3:
        out["spearman_gain_vs_psnr"] = spearman(gains, psnrs)
        out["spearman_gain_vs_look"] = spearman(gains, looks)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default="multiscale@real,combined@real,multiscale,classic",
                    help="demo style pairs, NAME or NAME@real (comma-separated)")
    ap.add_argument("--checkpoints", type=int, default=5,
                    help="checkpoints per training run (each scored for the selection check)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(ALL_METHODS))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--ngf", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--ndf", type=int, default=16)
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--local-tone-bins", type=int, default=1,
                    help="model.local_tone_bins for the trained methods and tone_filter (default 1: off for "
                         "tone_filter, the trainer's auto for the trained methods: on with --val-half)")
    add_data_arguments(ap)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per training run (0: torch's default)")
    ap.add_argument("--reference", type=Path, default=Path("/work/ref/cyclegan"),
                    help="checkout of the reference CycleGAN implementation (skipped when absent)")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-quality"), help="data and runs (reused)")
    ap.add_argument("--retrain", action="store_true", help="train again even if a run's model exists")
    ap.add_argument("--jobs", type=int, default=1, help="training runs at a time (default 1)")
    ap.add_argument("--no-train", action="store_true",
                    help="score existing runs only (wait for runs another process is still training)")
    ap.add_argument("--baseline-seeds", type=int, default=0,
                    help="train the classic recipe and the reference on only the first N seeds (0: all)")
    ap.add_argument("--score-only-pairs", default="",
                    help="style pairs scored without training (identity, histogram, tone_filter only)")
    ap.add_argument("--baseline-pairs", type=int, default=0,
                    help="train the classic recipe and the reference on the first N style pairs only (0: all)")
    ap.add_argument("--full-pairs", type=int, default=0,
                    help="all seeds for the first N style pairs only, the first seed for the others (0: all)")
    ap.add_argument("--val-half", action="store_true",
                    help="the default run's validation pairs (data.val) are the first half of the test pairs, "
                         "and every method is scored on the other half (else on all; the default run has no data.val)")
    ap.add_argument("--select-by", default="distribution", choices=("distribution", "auto"),
                    help="the default run's train.select_by: distribution (as without pairs, the default) or auto "
                         "(what dicom-node train does: the validation pairs, with --val-half)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a training setting for the default and paired runs (repeatable), e.g. train.lambda_coarse=10")
    ap.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    ap.add_argument("--panel", type=Path, default=None,
                    help="also write a PNG: per style pair, input | each method | target")
    args = ap.parse_args()
    pairs = [p for p in args.pairs.split(",") if p]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    if "reference" in methods and not (args.reference / "models" / "networks.py").exists():
        print(f"reference implementation not found at {args.reference}: skipped", flush=True)
        methods.remove("reference")
    args.work = args.work.resolve()  # the run configs name their data by path, relative to themselves
    args.work.mkdir(parents=True, exist_ok=True)
    baseline_seeds = seeds[:args.baseline_seeds] if args.baseline_seeds else seeds
    pair_seeds = {p: (seeds if p in pairs[:args.full_pairs] or not args.full_pairs else seeds[:1]) for p in pairs}

    def seeds_for(method: str, pair: str) -> list[int]:
        if method in ("identity", "histogram"):
            return seeds[:1]  # deterministic
        chosen = pair_seeds[pair]
        if method in (*TRAINED, "default_network", "reference") and pair in args.score_only_pairs.split(","):
            return []
        if method in ("classic", "reference"):
            if args.baseline_pairs and pair not in pairs[:args.baseline_pairs]:
                return []
            return [s for s in chosen if s in baseline_seeds]
        return chosen

    # Train first, --jobs runs at a time (each with --threads torch threads), then score.
    runs_of = {"default_network": "default"}  # the network kept out of the default run's export
    jobs = list(dict.fromkeys((runs_of.get(m, m), p, s) for p in pairs for m in methods
                              if runs_of.get(m, m) in (*TRAINED, "reference") for s in seeds_for(m, p)))
    if jobs:
        from concurrent.futures import ThreadPoolExecutor
        from functools import partial

        datas = {p: make_data(p, args.work, args) for p in pairs}
        datas_paired = {p: make_data(p, args.work, args, paired=True) for p in pairs if "paired" in methods}
        for p in pairs:
            (args.work / p).mkdir(exist_ok=True)
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for f in [pool.submit(train_reference if m == "reference" else partial(run_trainer, m),
                                  (datas_paired if m == "paired" else datas)[p], args.work / p, args, s)
                      for m, p, s in jobs]:
                f.result()
    args.retrain = False  # --retrain trained each run once, above; scoring reads those runs
    results: dict = {}
    panels: dict = {}
    for pair in pairs:
        data = make_data(pair, args.work, args)
        norms = domain_windows(data)
        test = load_test_pairs(data, norms)
        if args.val_half:  # the first half is the default run's data.val
            test = test[len(test) // 2:]
        a_arr, b_arr = load_domain_arrays(data / "A", norms["A"]), load_domain_arrays(data / "B", norms["B"])
        from dicom_node.engine.style_stats import style_statistics
        from dicom_node.train.data import pick_images
        from dicom_node.train.validate import STYLE_IMAGES

        style_ref = (pick_images(a_arr, STYLE_IMAGES), style_statistics(b_arr))
        work = args.work / pair
        work.mkdir(exist_ok=True)
        res = results.setdefault(pair, {})
        for method in methods:
            for seed in seeds_for(method, pair):
                print(f"{pair}: {method} seed {seed}", flush=True)
                if method == "identity":
                    fn = lambda img: img  # noqa: E731
                elif method == "histogram":
                    fn = histogram_lut(a_arr, b_arr)
                elif method in FIRST_STAGES:
                    fn = tone_filter_only(a_arr, b_arr, seed, local_bins=args.local_tone_bins, **FIRST_STAGES[method])
                elif method == "reference":
                    fn = reference_fn(data, work, args, seed)
                elif method == "paired":  # its own data set of true pairs; scored on the same test pairs
                    run_trainer(method, make_data(pair, args.work, args, paired=True), work, args, seed)
                    fn = checkpoint_fn(work / f"paired-seed{seed}", args.device)
                elif method == "default_network":  # the default run's best checkpoint, network kept
                    run_trainer("default", data, work, args, seed)
                    fn = checkpoint_fn(work / f"default-seed{seed}", args.device, best=True)
                else:
                    fn = engine_fn(run_trainer(method, data, work, args, seed), args.device)
                res.setdefault(method, {})[str(seed)] = score(fn, test, style_ref)
                if seed == seeds_for(method, pair)[0]:
                    panels.setdefault(pair, {"input": test[0][1], "target": test[0][2]})[method] = fn(test[0][1])
        res["_ranking"] = ranking(res)
        res["_gap"] = gap_closed(res)
        if "default" in methods:
            res["_selection"] = selection_check(work, seeds_for("default", pair), test, args.device)
        _write(args, results, pairs, seeds, methods)
    if args.panel:
        write_panel(args.panel, panels, methods)
    _table(results, pairs, methods)
    return 0


def write_panel(path: Path, panels: dict, methods: list[str], crop: int = 224) -> None:
    """One row per style pair, the centre of its first held-out image: input, each method, target.

    Each method's output is shown after the same affine fit the score uses."""
    from PIL import Image, ImageDraw

    from dicom_node.engine.preview import save_png, to_u8

    cols = ["input"] + [m for m in methods if m != "identity"] + ["target"]
    rows = []
    for pair, imgs in panels.items():
        tgt = imgs["target"]
        h, w = tgt.shape
        y0, x0 = (h - crop) // 2, (w - crop) // 2
        tiles = []
        for c in cols:
            if c not in imgs:
                continue
            img = imgs[c] if c in ("input", "target") else affine_fit(imgs[c], tgt)
            u8 = to_u8(img[y0:y0 + crop, x0:x0 + crop])
            tile = Image.fromarray(u8)  # grayscale: a quarter of an RGB file's size
            ImageDraw.Draw(tile).text((4, 4), f"{pair}: {c}" if c == "input" else c, fill=255)
            tiles.append(np.asarray(tile))
        rows.append(np.concatenate(tiles, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]))) for r in rows]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_png(np.concatenate(rows, axis=0), path, optimize=True)
    print(f"wrote {path}")


def gap_closed(res: dict) -> dict:
    """Per method, the share of the gap between the tone filter and the paired ceiling that it
    closes (mean PSNR over seeds); absent without both."""
    mean = {m: float(np.mean([r["psnr"] for r in runs.values()])) for m, runs in res.items()
            if not m.startswith("_") and runs}
    if "tone_filter" not in mean or "paired" not in mean:
        return {}
    gap = mean["paired"] - mean["tone_filter"]
    out = {"ceiling_over_tone_db": gap}
    if abs(gap) > 1e-6:
        out.update({m: (v - mean["tone_filter"]) / gap for m, v in mean.items()})
    return out


def ranking(res: dict) -> dict:
    """Spearman rank correlation, over every trained or fitted model of a style pair, between
    the style distance (no pairs needed: lower is better) and the affine PSNR on the pairs."""
    d, p = [], []
    for method, runs in res.items():
        if method.startswith("_"):
            continue
        for r in runs.values():
            if "style_distance" in r:
                d.append(r["style_distance"]["total"])
                p.append(r["psnr"])
    if len(d) < 3:
        return {"models": len(d)}
    return {"models": len(d), "spearman_distance_vs_psnr": -spearman(d, p)}  # lower distance: better


def _write(args, results, pairs, seeds, methods) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    import torch

    doc = {"benchmark": "quality", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": machine_info(), "torch": torch.__version__,
           "budget": {"ngf": args.ngf, "n_blocks": args.blocks, "ndf": args.ndf, "patch_size": args.patch,
                      "batch_size": args.batch, "steps": args.steps, "device": args.device},
           "data": {"size": args.size, "count": args.count, "test_count": args.test_count,
                    "data_seed": args.data_seed, "unpaired": True},
           "pairs": pairs, "seeds": seeds, "methods": methods,
           "options": {k: v if isinstance(v, (int, float, bool)) else str(v) for k, v in vars(args).items()},
           "results": results}
    args.out.write_text(json.dumps(doc, indent=1) + "\n")


def _table(results, pairs, methods) -> None:
    print()
    print(f"{'style pair':<10} {'method':<12} {'affine PSNR dB (per seed)':<28} {'mean':>6} {'SSIM':>6} "
          f"{'vs hist':>8} {'vs id':>7} {'worst img vs id':>15} {'style dist':>9} {'as written':>10}")
    for pair in pairs:
        res = results.get(pair, {})
        hist = np.mean([r["psnr"] for r in res.get("histogram", {}).values()]) if "histogram" in res else math.nan
        ident = np.mean([r["psnr"] for r in res.get("identity", {}).values()]) if "identity" in res else math.nan
        for method in methods:
            if method not in res:
                continue
            sd = np.mean([r["style_distance"]["total"] for r in res[method].values() if "style_distance" in r])
            runs = res[method]
            per = " ".join(f"{r['psnr']:.1f}" for r in runs.values())
            mean = float(np.mean([r["psnr"] for r in runs.values()]))
            ss = float(np.mean([r["ssim"] for r in runs.values()]))
            worst = min(r["worst_margin_db"] for r in runs.values())
            written = np.mean([r.get("psnr_as_written", math.nan) for r in runs.values()])
            print(f"{pair:<10} {method:<12} {per:<28} {mean:6.2f} {ss:6.3f} {mean - hist:+8.2f} {mean - ident:+7.2f} "
                  f"{worst:+15.2f} {sd:9.3f} {written:10.2f}")
        gap = res.get("_gap", {})
        if gap:
            print(f"{pair:<10} paired ceiling over the tone filter: {gap['ceiling_over_tone_db']:+.2f} dB; gap closed: "
                  + ", ".join(f"{m} {v:+.0%}" for m, v in gap.items() if m != "ceiling_over_tone_db"))
        sel = res.get("_selection", {})
        if "spearman_gain_vs_psnr" in sel:
            print(f"{pair:<10} the gain by {sel.get('criterion', 'band distribution')} ranks {sel['checkpoints']} "
                  f"checkpoints like their PSNR on held-out pairs: Spearman {sel['spearman_gain_vs_psnr']:+.2f} "
                  f"as written, {sel.get('spearman_gain_vs_look', float('nan')):+.2f} in look")
        rank = res.get("_ranking", {})
        if "spearman_distance_vs_psnr" in rank:
            print(f"{pair:<10} style distance ranks {rank['models']} models like PSNR: "
                  f"Spearman {rank['spearman_distance_vs_psnr']:+.2f}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

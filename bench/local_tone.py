"""The first stage with and without local tone curves (``model.local_tone_bins``), over data seeds.

Why: adaptive equalisation and strong dynamic-range compression map a value differently in a
dark and in a bright neighbourhood, which the global stage (tone curve, band curves, tone
curve) cannot express.  Local tone curves, one per bin of local brightness, are fitted by
matching conditional distributions; a conditional distribution holds more of the domains'
*content* than a marginal one, so how much they gain, or lose, depends on which images each
domain holds.  This script fits the first stage as ``dicom-node train`` does (its defaults),
with ``local_tone_bins`` 1 (off, the default) and each of ``--bins``, on demo data of several
data seeds (other phantoms or crops each), and scores each on the held-out true pairs (affine
PSNR, as ``bench/quality.py``): per pair and seed the mean over images and the worst image's
margin over the same stage without local curves.  No network is trained: a minute per pair
and seed.

``--with-pairs``: the trainer's path when validation pairs are given (``data.val``): half of
the held-out pairs choose the quantiles, the level and the shape and check the local tone
curves (``train/tone_fit.py``, ``_with_local_tone_if_better``), the other half scores (look and
as written), both ways round, so no choice is scored on the pairs that made it.  Why: with
validation pairs the trainer turns local tone curves on by default (``model.local_tone_bins:
auto``); this shows what the pairs' check keeps and what it costs where they do not help.
``python bench/local_tone.py --with-pairs`` (``bench/results/local-tone-pairs.json``).

``python bench/local_tone.py``; writes ``bench/results/local-tone.json``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import write_results  # noqa: E402
from quality import (  # noqa: E402
    RESULTS,
    add_data_arguments,
    affine_scores,
    domain_windows,
    load_domain_arrays,
    load_test_pairs,
    make_data,
    stage_scores,
)


def score_seed(pair: str, seed: int, bins: list[int], args: argparse.Namespace) -> dict:
    """Identity and each number of local bins (1: off) on ``pair``'s demo data of ``seed``."""
    import torch

    from dicom_node.train.tone_fit import fit_tone_filter

    data_args = argparse.Namespace(**{**vars(args), "data_seed": seed})
    data = make_data(pair, args.work / f"seed{seed}", data_args)
    norms = domain_windows(data)
    tests = load_test_pairs(data, norms)
    a, b = load_domain_arrays(data / "A", norms["A"]), load_domain_arrays(data / "B", norms["B"])
    per_image = {"identity": [affine_scores(x, y)[0] for _, x, y in tests]}
    for n in [1, *bins]:
        tf = fit_tone_filter(a, b, band_curves=True, brightness_bins=4, local_bins=n, seed=0)
        with torch.no_grad():
            per_image[str(n)] = [affine_scores(tf(torch.from_numpy(x)[None, None])[0, 0].numpy(), y)[0]
                                 for _, x, y in tests]
    out: dict = {k: float(np.mean(v)) for k, v in per_image.items()}
    for n in bins:
        out[f"worst_vs_off_{n}"] = float(min(p - q for p, q in zip(per_image[str(n)], per_image["1"])))
    out["images"] = per_image
    if args.with_pairs:
        out["with_pairs"] = _with_pairs(a, b, [(x, y) for _, x, y in tests], bins)
    return out


def _with_pairs(a: list, b: list, tests: list, bins: list[int]) -> dict:
    """The trainer's first stage given validation pairs, each number of local bins (1: off):
    half of ``tests`` validate, the other half score, both ways round; per held-out image in
    test order, look and as written, and which folds kept the local curves."""
    from dicom_node.train.tone_fit import fit_tone_filter

    half = len(tests) // 2
    folds = [(tests[:half], tests[half:]), (tests[half:], tests[:half])]
    back = len(tests) - half
    out: dict = {"look": {}, "written": {}, "kept": {}}
    for n in bins:  # "1": the stage the pairs chose without local curves
        look, written, kept, off_look, off_written = [], [], [], [], []
        for val, held in folds:
            tf = fit_tone_filter(a, b, band_curves=True, brightness_bins=4, local_bins=n, pairs=val, seed=0)
            kept.append(tf.local_tone_changes())  # left out: the identity
            lk, wr = stage_scores(tf, held)
            look, written = look + lk, written + wr
            if kept[-1]:  # the local curves' stage is the chosen one as fitted: "off" is its own fit
                tf = fit_tone_filter(a, b, band_curves=True, brightness_bins=4, pairs=val, seed=0)
            lk, wr = stage_scores(tf.before_local_tone, held)
            off_look, off_written = off_look + lk, off_written + wr
        out["look"][str(n)] = look[back:] + look[:back]
        out["written"][str(n)] = written[back:] + written[:back]
        out["look"]["1"], out["written"]["1"] = off_look[back:] + off_look[:back], off_written[back:] + off_written[:back]
        out["kept"][str(n)] = kept
    out["look"]["identity"], out["written"]["identity"] = stage_scores(None, tests)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default="multiscale,combined,clahe,denoise,unsharp,classic,multiscale@real,combined@real")
    ap.add_argument("--seeds", default="0,1,2", help="data seeds: other phantoms or crops in each")
    ap.add_argument("--bins", default="8", help="local tone bins to compare with none")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-local-tone"), help="demo data, one folder per seed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--with-pairs", action="store_true",
                    help="also the trainer's path with validation pairs (half the test pairs, both ways round)")
    ap.add_argument("--out", type=Path, default=RESULTS / "local-tone.json")
    add_data_arguments(ap)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    bins = [int(b) for b in args.bins.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict = {}
    for pair in args.pairs.split(","):
        results[pair] = {}
        for seed in seeds:
            r = results[pair][str(seed)] = score_seed(pair, seed, bins, args)
            print(f"{pair} seed {seed}: identity {r['identity']:.2f}, off {r['1']:.2f}, "
                  + ", ".join(f"{n} bins {r[str(n)]:.2f} (worst image {r[f'worst_vs_off_{n}']:+.2f})" for n in bins),
                  flush=True)
            if args.with_pairs:
                wp = r["with_pairs"]
                print("  with pairs: " + ", ".join(
                    f"{n}: {np.mean(wp['look'][n]):.2f} / {np.mean(wp['written'][n]):.2f}"
                    + (f" kept {wp['kept'][n]}" if n in wp["kept"] else "") for n in wp["look"]), flush=True)
        write_results(args.out, args, "local-tone", results=results)
    print("\n| style pair | " + " | ".join(f"seed {s}: off / {' / '.join(f'{n} bins' for n in bins)}" for s in seeds)
          + " | mean gain | worst image |")
    print("| --- |" + " ---: |" * (len(seeds) + 2))
    for pair, rs in results.items():
        gains = [rs[str(s)][str(n)] - rs[str(s)]["1"] for s in seeds for n in bins]
        worst = min(rs[str(s)][f"worst_vs_off_{n}"] for s in seeds for n in bins)
        print(f"| {pair} | " + " | ".join(f"{rs[str(s)]['1']:.2f} / " + " / ".join(f"{rs[str(s)][str(n)]:.2f}" for n in bins)
                                          for s in seeds) + f" | {np.mean(gains):+.2f} | {worst:+.2f} |")
    if args.with_pairs:
        _print_with_pairs(results, seeds, bins)
    print(f"\nwrote {args.out}")
    return 0


def _print_with_pairs(results: dict, seeds: list[int], bins: list[int]) -> None:
    """The table of ``--with-pairs``: look / as written, off against each number of bins."""
    print("\nWith validation pairs (half choose, half score, both ways round): look / as written, mean of the seeds")
    print("| style pair | identity | off | " + " | ".join(f"{n} bins" for n in bins)
          + " | folds kept | worst image vs off (look / written) | worst image vs identity (look / written) |")
    print("| --- | ---: | ---: |" + " ---: |" * len(bins) + " --- | ---: | ---: |")
    for pair, rs in results.items():
        wp = [rs[str(s)]["with_pairs"] for s in seeds]
        cells = [f"{np.mean([np.mean(w['look'][str(n)]) for w in wp]):.2f} / "
                 f"{np.mean([np.mean(w['written'][str(n)]) for w in wp]):.2f}" for n in ["identity", 1, *bins]]
        kept = sum(sum(w["kept"][str(n)]) for w in wp for n in bins)
        folds = sum(len(w["kept"][str(n)]) for w in wp for n in bins)
        worst = [min(p - q for p, q in zip(w[kind][str(n)], w[kind]["1"])) for kind in ("look", "written")
                 for w in wp for n in bins]
        vs_id = [min(p - q for p, q in zip(w[kind][str(n)], w[kind]["identity"])) for kind in ("look", "written")
                 for w in wp for n in bins]
        half = len(worst) // 2
        print(f"| {pair} | " + " | ".join(cells) + f" | {kept} of {folds} | {min(worst[:half]):+.2f} / "
              f"{min(worst[half:]):+.2f} | {min(vs_id[:half]):+.2f} / {min(vs_id[half:]):+.2f} |")


if __name__ == "__main__":
    sys.exit(main())

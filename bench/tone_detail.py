"""How many quantiles the first stage's tone curves should match, and whether validation pairs choose well.

Why: matched at every quantile (the trainer's fit without pairs) a tone curve copies the whole
shape of the target domain's histogram, and on crops of other anatomy in each domain much of
that shape is content: the first stage ended below the input there (``first-stage-content-real.json``).
Matched at a few quantiles it keeps the look's overall contrast only.  For each style pair and
data seed this script fits the first stage as ``dicom-node train`` does (band curves, 4
brightness bins) with its tone curves through each number of quantiles in
``train/tone_fit.py``'s ``TONE_QUANTILES`` (0: no first stage, the identity), and scores each on the held-out true pairs (affine
PSNR, as ``bench/quality.py``).  Then the trainer's own choice (``choose_tone_detail``), made on
half of the test pairs as validation pairs and scored on the other half, both ways round: a
choice never scored on the pairs that made it; each option's output level fitted on those
pairs then (``fit_level``), as the trainer does, and the choice without it for comparison.

``python bench/tone_detail.py``; writes ``bench/results/tone-detail.json``.
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
    domain_windows,
    load_domain_arrays,
    load_test_pairs,
    make_data,
    stage_scores,
)


def score_seed(pair: str, seed: int, args: argparse.Namespace) -> dict:
    """Per held-out image: identity, each number of quantiles, and the cross-validated choice."""
    from dicom_node.train.stage_choice import TONE_QUANTILES, choose_shape, choose_tone_detail, fit_level
    from dicom_node.train.tone_fit import fit_tone_filter

    data = make_data(pair, args.work / f"seed{seed}", argparse.Namespace(**{**vars(args), "data_seed": seed}))
    norms = domain_windows(data)
    tests = [(x, y) for _, x, y in load_test_pairs(data, norms)]
    a, b = load_domain_arrays(data / "A", norms["A"]), load_domain_arrays(data / "B", norms["B"])
    stages = {q: fit_tone_filter(a, b, band_curves=True, brightness_bins=4, tone_quantiles=q, seed=0) for q in TONE_QUANTILES}

    per_image, written = {}, {}  # look (affine PSNR) and as written (plain PSNR, what the node sends)
    per_image["identity"], written["identity"] = stage_scores(None, tests)
    for q, tf in stages.items():
        per_image[str(q)], written[str(q)] = stage_scores(tf, tests)
    half = len(tests) // 2
    folds = [(tests[:half], tests[half:]), (tests[half:], tests[:half])]  # (validation, held out)
    back = len(tests) - half  # back in test order
    picks = [choose_tone_detail(stages, val) for val, _ in folds]
    kept = []
    for name, level, shape in (("chosen_shaped", True, True), ("chosen", True, False), ("chosen_unleveled", False, False)):
        chosen, chosen_written = [], []  # the trainer's (the quantiles, the level, the shape); before each
        for (val, held), pick in zip(folds, picks):
            stage = fit_level(stages[pick], val) if level else stages[pick]
            if shape:
                stage, share, _ = choose_shape(stage, val)
                kept.append(share)
            look, as_written = stage_scores(stage, held)
            chosen += look
            chosen_written += as_written
        per_image[name], written[name] = chosen[back:] + chosen[:back], chosen_written[back:] + chosen_written[:back]
    out: dict = {k: float(np.mean(v)) for k, v in per_image.items()}
    out["as_written"] = {k: float(np.mean(v)) for k, v in written.items()}
    out["picks"] = out["picks_unleveled"] = picks  # the level is fitted after the choice
    out["shape_kept"] = kept  # per fold, the share of the chosen stage's shape kept
    for name in ("chosen", "chosen_shaped"):
        out[f"worst_{name}_vs_identity"] = float(min(c - i for c, i in zip(per_image[name], per_image["identity"])))
    out["images"], out["images_as_written"] = per_image, written
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default="multiscale,combined,clahe,denoise,unsharp,classic,"
                                        "multiscale@real,combined@real,clahe@real,denoise@real,unsharp@real")
    ap.add_argument("--seeds", default="0,1,2", help="data seeds: other phantoms or crops in each")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-local-tone"), help="demo data, one folder per seed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "tone-detail.json")
    add_data_arguments(ap)
    args = ap.parse_args()
    import torch

    from dicom_node.train.stage_choice import TONE_QUANTILES, detail_name

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    cols = [str(q) for q in TONE_QUANTILES]
    results: dict = {}
    for pair in args.pairs.split(","):
        results[pair] = {}
        for seed in seeds:
            r = results[pair][str(seed)] = score_seed(pair, seed, args)
            print(f"{pair} seed {seed}: identity {r['identity']:.2f}, " + ", ".join(f"{c} {r[c]:.2f}" for c in cols)
                  + f", chosen {r['chosen']:.2f} (picks {r['picks']}, worst image vs identity {r['worst_chosen_vs_identity']:+.2f}; "
                  f"as written {r['as_written']['chosen']:.2f}, before the level {r['chosen_unleveled']:.2f} / "
                  f"{r['as_written']['chosen_unleveled']:.2f}; shape kept {r['shape_kept']}: {r['chosen_shaped']:.2f} / "
                  f"{r['as_written']['chosen_shaped']:.2f}, worst {r['worst_chosen_shaped_vs_identity']:+.2f})",
                  flush=True)
        write_results(args.out, args, "tone-detail", results=results)
    names = [detail_name(q) for q in TONE_QUANTILES]
    print("\nMean over seeds of the held-out images' affine PSNR (dB); columns: quantiles matched.")
    print("| style pair | identity | " + " | ".join(names) + " | chosen on half, scored on the other (before the level)"
          " | worst image: chosen − identity | as written: identity, chosen (before the level) |"
          " with the shape chosen too: look, as written, worst image − identity |")
    print("| --- |" + " ---: |" * (len(names) + 5))
    keys = ("identity", "chosen", "chosen_unleveled", "chosen_shaped")
    for pair, rs in results.items():
        mean = {k: np.mean([rs[str(s)][k] for s in seeds]) for k in ["identity", *cols, *keys[1:]]}
        written = {k: np.mean([rs[str(s)]["as_written"][k] for s in seeds]) for k in keys}
        worst, worst_shaped = (min(rs[str(s)][f"worst_{k}_vs_identity"] for s in seeds) for k in ("chosen", "chosen_shaped"))
        print(f"| {pair} | {mean['identity']:.2f} | " + " | ".join(f"{mean[c]:.2f}" for c in cols)
              + f" | {mean['chosen']:.2f} ({mean['chosen_unleveled']:.2f}) | {worst:+.2f} | {written['identity']:.2f}, "
              f"{written['chosen']:.2f} ({written['chosen_unleveled']:.2f}) | {mean['chosen_shaped']:.2f}, "
              f"{written['chosen_shaped']:.2f}, {worst_shaped:+.2f} |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

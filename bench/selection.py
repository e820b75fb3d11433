"""Unpaired checkpoint selection: how each criterion ranks models, and what it would export.

Why: without true pairs the trainer must still tell a network that improves on its first stage
(the tone filter) from one that damages it, and pick the best checkpoint (issue 23: rank
correlation with true-pair PSNR of at least 0.8, over checkpoints and methods).  This script
re-scores what ``bench/quality.py`` trained and kept (every stored checkpoint of its
``default`` and ``paired`` runs, and the methods without a network) by each criterion, in the
same run, on the same images:

* ``band distribution`` (``train/band_distance.py``, ``select_by: distribution``): the sliced
  Wasserstein distance of G(A) from B's joint band distribution; its gain over the first stage
  in dB of that distance;
* ``pseudo-pairs`` (``select_by: pseudo``): ``PSNR(G(T_ba(b)), b)``, and its gain over the first
  stage;
* the truth: affine PSNR of A->B on the held-out true pairs (as ``bench/quality.py`` scores),
  and plain PSNR (no gain/offset fitted: the absolute level the node writes counts too).

Per style pair it reports the Spearman rank correlation of each criterion (the distance
negated) with the true PSNR, over every model ("all": identity, histogram matching, first
stages, checkpoints) and over the trained ones only, and the export decisions each criterion's
gain and margin (``train/criteria.py``, ``MARGIN_DB``) would make against the true gain over the
first stage, by each truth: a network kept that loses on true pairs is a *wrong keep*, a
network more than :data:`CLEAR_GAIN_DB` better on true pairs that falls back is a *missed gain*.

``python bench/selection.py --work runs/bench-quality-bins --pairs multiscale,classic`` after
``bench/quality.py --work runs/bench-quality-bins``; writes ``bench/results/selection.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info  # noqa: E402
from quality import (  # noqa: E402  (bench/ is on sys.path when run as a script)
    RESULTS,
    affine_scores,
    domain_windows,
    load_domain_arrays,
    load_test_pairs,
    spearman,
)
from quality_methods import histogram_lut, load_generators  # noqa: E402

CLEAR_GAIN_DB = 0.5  # a true gain over the first stage that an export should not miss


def stored_models(works: list[Path], pair: str) -> dict[str, tuple]:
    """Every stored checkpoint of the pair's default and paired runs (the first work folder that
    has runs of a kind), and each default run's first stage alone."""
    from dicom_node.train.selection import zero_network

    models: dict[str, tuple] = {}
    for kind in ("default", "paired"):
        for work in works:
            runs = sorted((work / pair).glob(f"{kind}-seed*/checkpoints"))
            if not runs:
                continue
            for run in runs:
                name = run.parent.name
                steps = sorted(run.glob("step_*.pt"))
                for ckpt in steps:
                    models[f"{name}/{int(ckpt.stem[5:])}"] = (kind, *load_generators(ckpt))
                if kind == "default" and steps:
                    g_ab, g_ba = models[f"{name}/{int(steps[-1].stem[5:])}"][1:]
                    models[f"{name}/first stage"] = ("first stage", zero_network(g_ab), zero_network(g_ba))
            break
    return models


def score_pair(works: list[Path], pair: str, device: str) -> dict:
    from dicom_node.engine import translate
    from dicom_node.engine.model_file import StyleModel
    from dicom_node.engine.quality import psnr
    from dicom_node.train.band_distance import BandDistance, distance_gain_db
    from dicom_node.train.data import pick_images
    from dicom_node.train.selection import (
        DISTRIBUTION_IMAGES,
        DISTRIBUTION_TARGET_IMAGES,
        PSEUDO_IMAGES,
        first_stage,
        pseudo_pairs,
    )

    data = next(w / f"data-{pair}" for w in works if (w / f"data-{pair}").exists())
    norms = domain_windows(data)
    tests = load_test_pairs(data, norms)
    a_all, b_all = load_domain_arrays(data / "A", norms["A"]), load_domain_arrays(data / "B", norms["B"])
    a_imgs, b_imgs = pick_images(a_all, DISTRIBUTION_IMAGES), pick_images(b_all, PSEUDO_IMAGES)
    distance = BandDistance(pick_images(b_all, DISTRIBUTION_TARGET_IMAGES))

    def truths(fn) -> tuple[float, float]:
        outs = [(fn(a), b) for _, a, b in tests]
        return (float(np.mean([affine_scores(y, b)[0] for y, b in outs])), float(np.mean([psnr(y, b) for y, b in outs])))

    def row(fn, stage=None, reverse=None) -> dict:
        out = dict(zip(("true_psnr", "true_psnr_plain"), truths(fn)), distance=distance([fn(a) for a in a_imgs]))
        if stage is not None:
            first = truths(stage)
            out["true_gain_db"], out["true_plain_gain_db"] = out["true_psnr"] - first[0], out["true_psnr_plain"] - first[1]
            out["distance_gain_db"] = distance_gain_db(distance([stage(a) for a in a_imgs]), out["distance"])
            pairs = pseudo_pairs(reverse, b_imgs)
            out["pseudo_psnr"] = float(np.mean([psnr(fn(x), y) for _, x, y in pairs]))
            out["pseudo_gain_db"] = out["pseudo_psnr"] - float(np.mean([psnr(stage(x), y) for _, x, y in pairs]))
        return out

    lut = histogram_lut(a_all, b_all)
    rows = {"identity": {"kind": "identity", **row(lambda x: np.asarray(x, np.float32))},
            "histogram": {"kind": "histogram", **row(lut)}}
    for name, (kind, g_ab, g_ba) in stored_models(works, pair).items():
        model = StyleModel(generator=g_ab, metadata={"name": "checkpoint"})
        rows[name] = {"kind": kind, **row(lambda x, m=model: np.clip(translate(m, x, device=device), -1, 1),
                                          first_stage(g_ab), g_ba)}
        print(f"  {pair} {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in rows[name].items() if k != "kind"), flush=True)
    return {"models": rows, **summary(rows)}


def summary(rows: dict) -> dict:
    """Rank correlations and export decisions (module doc)."""
    from dicom_node.train.criteria import BAND_DISTRIBUTION, MARGIN_DB, PSEUDO_PAIRS

    out: dict = {}
    for subset, names in (("all", list(rows)), ("trained", [n for n in rows if rows[n]["kind"] not in ("identity", "histogram")])):
        truth = [rows[n]["true_psnr"] for n in names]
        out[f"spearman_distance_{subset}"] = spearman([-rows[n]["distance"] for n in names], truth)
        with_pseudo = [n for n in names if "pseudo_psnr" in rows[n]]
        if subset == "trained" and len(with_pseudo) >= 3:
            out["spearman_pseudo_trained"] = spearman([rows[n]["pseudo_psnr"] for n in with_pseudo],
                                                      [rows[n]["true_psnr"] for n in with_pseudo])
    networks = [r for r in rows.values() if r["kind"] in ("default", "paired")]
    for label, key, margin in (("distance", "distance_gain_db", MARGIN_DB[BAND_DISTRIBUTION]),
                               ("pseudo", "pseudo_gain_db", MARGIN_DB[PSEUDO_PAIRS])):
        out[f"kept_{label}"] = sum(r[key] > margin for r in networks)
        for truth, gain in (("affine", "true_gain_db"), ("plain", "true_plain_gain_db")):
            out[f"wrong_keeps_{label}_{truth}"] = sum(r[key] > margin and r[gain] < 0 for r in networks)
            out[f"missed_gains_{label}_{truth}"] = sum(r[key] <= margin and r[gain] > CLEAR_GAIN_DB for r in networks)
    out["networks"] = len(networks)
    for truth, gain in (("affine", "true_gain_db"), ("plain", "true_plain_gain_db")):
        out[f"clear_gains_{truth}"] = sum(r[gain] > CLEAR_GAIN_DB for r in networks)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="runs/bench-quality-bins",
                    help="bench/quality.py work folders (comma-separated; the first that has a kind of run is used)")
    ap.add_argument("--pairs", default="multiscale,classic,multiscale@real")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "selection.json"))
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    works = [Path(w) for w in args.work.split(",")]
    results = {p: score_pair(works, p, args.device) for p in args.pairs.split(",")}
    Path(args.out).write_text(json.dumps({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                          "machine": machine_info(), "args": vars(args), "pairs": results}, indent=1))
    print("\n| style pair | models | Spearman, distance (all / trained) | Spearman, pseudo-pairs (trained) | networks | "
          "clearly better (affine / plain) | kept: distance / pseudo | wrong keeps, distance (affine / plain) | "
          "wrong keeps, pseudo (affine / plain) | missed gains, distance (affine / plain) | missed gains, pseudo (affine / plain) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for pair, r in results.items():
        both = lambda key: f"{r[key + '_affine']} / {r[key + '_plain']}"  # noqa: E731
        print(f"| {pair} | {len(r['models'])} | {r['spearman_distance_all']:+.2f} / {r['spearman_distance_trained']:+.2f} | "
              f"{r.get('spearman_pseudo_trained', float('nan')):+.2f} | {r['networks']} | {both('clear_gains')} | "
              f"{r['kept_distance']} / {r['kept_pseudo']} | {both('wrong_keeps_distance')} | {both('wrong_keeps_pseudo')} | "
              f"{both('missed_gains_distance')} | {both('missed_gains_pseudo')} |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

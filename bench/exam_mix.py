"""The first stage on domains with another mix of examinations, as the domains are and weighted by body part.

Why: the first stage matches the two domains' distributions, and a chest and a knee have
different ones whatever the vendor, so two archives with other mixes of examinations make it
read the mix as style.  For each style pair and data seed this script makes ``demo-data
--unpaired`` with 24 images per domain and cuts two data sets from it (hard links, each with
its own domain windows, as ``dicom-node train`` measures them): ``one mix``, 8 chests and 4
knees (or legs) in each domain, and ``other mixes``, 12 chests and 2 knees in A against 4
chests and 8 knees in B.  It fits the first stage as the trainer does (band curves, 4
brightness bins, 9 quantiles, no validation pairs) on each, once as the domains are and once
with each image's body part (BodyPartExamined, read by the trainer's own loader) so that
:mod:`dicom_node.train.exam_mix` weighs the parts alike, and scores A→B on the same 6 held-out
true pairs (affine PSNR, "look", and plain PSNR, "as written").

``python bench/exam_mix.py``; writes ``bench/results/exam-mix.json``.  ``--quality-work DIR``
instead lays out each pair's ``other mixes`` set as ``DIR/data-PAIR`` (hard links) for
``bench/quality.py --work DIR``, which trains on it through the product.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import write_results  # noqa: E402
from quality import RESULTS, domain_windows, load_test_pairs, make_data, stage_scores  # noqa: E402

MIXES = {"one mix": ((8, 4), (8, 4)), "other mixes": ((12, 2), (4, 8))}  # (chests, others) in A, in B


def cut(data: Path, out: Path, mix: tuple[tuple[int, int], tuple[int, int]]) -> Path:
    """A data set of ``data``'s files (hard links): ``mix`` chests and others per domain, its test/ whole."""
    if (out / "done").exists():
        return out
    for domain, (chests, others) in zip("AB", mix):
        files = sorted((data / domain).glob("*.dcm"))
        chest = [f for f in files if f.stem.endswith("_chest")]
        other = [f for f in files if not f.stem.endswith("_chest")]
        if len(chest) < chests or len(other) < others:
            raise SystemExit(f"{data / domain}: {len(chest)} chests and {len(other)} others, {chests} and {others} needed")
        (out / domain).mkdir(parents=True, exist_ok=True)
        for f in chest[:chests] + other[:others]:
            os.link(f, out / domain / f.name)
    for sub in ("A", "B"):
        (out / "test" / sub).mkdir(parents=True, exist_ok=True)
        for f in sorted((data / "test" / sub).iterdir()):
            os.link(f, out / "test" / sub / f.name)
    (out / "done").write_text("")
    return out


def lay_out_for_quality(args: argparse.Namespace, data_args: argparse.Namespace) -> int:
    """Each pair's ``other mixes`` set (the first seed's) as ``data-PAIR`` under ``--quality-work``."""
    seed = int(args.seeds.split(",")[0])
    for pair in args.pairs.split(","):
        full = make_data(pair, args.work / f"seed{seed}", argparse.Namespace(**vars(data_args), data_seed=seed))
        out = args.quality_work / f"data-{pair}"
        if not out.exists():
            cut(full, out, MIXES["other mixes"])
            os.link(full / "manifest.json", out / "manifest.json")  # bench/quality.py's sign of a finished set
        print(f"{out}: A {len(list((out / 'A').glob('*.dcm')))} images, B {len(list((out / 'B').glob('*.dcm')))}")
    return 0


def score_mix(data: Path) -> dict:
    """Identity, the fit as the domains are and the fit weighted by body part, per held-out image."""
    from dicom_node.train.data import load_domain
    from dicom_node.train.exam_mix import mix_repeats
    from dicom_node.train.tone_fit import fit_tone_filter

    norms = domain_windows(data)
    tests = [(x, y) for _, x, y in load_test_pairs(data, norms)]
    a, b = (load_domain(data / d, d, data / ".cache", norms[d]) for d in "AB")
    fits = {"as the domains are": fit_tone_filter(a.arrays, b.arrays, band_curves=True, brightness_bins=4, seed=0),
            "weighted by body part": fit_tone_filter(a.arrays, b.arrays, band_curves=True, brightness_bins=4, seed=0,
                                                     src_parts=a.body_parts, dst_parts=b.body_parts)}
    out: dict = {"body_parts": {"A": a.body_parts, "B": b.body_parts},
                 "repeats": dict(zip("AB", mix_repeats(a.body_parts, b.body_parts)))}
    look, written = {}, {}
    for name, tf in {"identity": None, **fits}.items():
        look[name], written[name] = stage_scores(tf, tests)
    out["look"] = {k: float(np.mean(v)) for k, v in look.items()}
    out["as_written"] = {k: float(np.mean(v)) for k, v in written.items()}
    out["worst_vs_identity"] = {k: float(min(np.subtract(v, look["identity"]))) for k, v in look.items() if k != "identity"}
    out["images"], out["images_as_written"] = look, written
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default="multiscale,combined,clahe,denoise,unsharp,classic,multiscale@real,combined@real")
    ap.add_argument("--seeds", default="0,1", help="data seeds: other phantoms or crops in each")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-exam-mix"), help="demo data, one folder per seed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "exam-mix.json")
    ap.add_argument("--quality-work", type=Path, help="only lay out the other-mixes sets for bench/quality.py")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    data_args = argparse.Namespace(count=24, test_count=6, size=512)
    if args.quality_work:
        return lay_out_for_quality(args, data_args)
    results: dict = {}
    for pair in args.pairs.split(","):
        results[pair] = {}
        for seed in (int(s) for s in args.seeds.split(",")):
            work = args.work / f"seed{seed}"
            full = make_data(pair, work, argparse.Namespace(**vars(data_args), data_seed=seed))
            r = results[pair][str(seed)] = {mix: score_mix(cut(full, work / f"{pair}-{mix.replace(' ', '-')}", counts))
                                            for mix, counts in MIXES.items()}
            print(f"{pair} seed {seed}: " + "; ".join(
                f"{mix}: identity {m['look']['identity']:.2f}, as they are {m['look']['as the domains are']:.2f}, "
                f"weighted {m['look']['weighted by body part']:.2f} (repeats A {sorted(set(m['repeats']['A']))}, "
                f"B {sorted(set(m['repeats']['B']))})" for mix, m in r.items()), flush=True)
        write_results(args.out, args, "exam-mix", results=results)
    print("\nMean over seeds, A→B on the 6 held-out pairs: look (affine PSNR) / as written (plain PSNR), dB; "
          "worst image − identity in look.")
    print("| style pair | identity | one mix | other mixes, as the domains are | **other mixes, weighted by body part** "
          "| worst image − identity: as they are, weighted | one mix, weighted (unchanged?) |")
    print("| --- |" + " ---: |" * 6)
    for pair, rs in results.items():
        def mean(mix: str, key: str, kind: str = "look") -> float:
            return float(np.mean([rs[s][mix][kind][key] for s in rs]))

        def both(mix: str, key: str) -> str:
            return f"{mean(mix, key):.2f} / {mean(mix, key, 'as_written'):.2f}"

        worst = [min(rs[s]["other mixes"]["worst_vs_identity"][k] for s in rs)
                 for k in ("as the domains are", "weighted by body part")]
        print(f"| {pair} | {both('one mix', 'identity')} | {both('one mix', 'as the domains are')} | "
              f"{both('other mixes', 'as the domains are')} | **{both('other mixes', 'weighted by body part')}** | "
              f"{worst[0]:+.2f}, {worst[1]:+.2f} | {both('one mix', 'weighted by body part')} |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

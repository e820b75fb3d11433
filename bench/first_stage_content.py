"""How much of the unpaired first stage's error is the content of its two domains, and which part.

Why: ``bench/quality.py``'s paired ceilings on ``denoise`` and ``unsharp`` beat the unpaired
first stage by 4 to 7 dB, and ``bench/selection.py`` showed that nearly all of it is the paired
run's *first stage*: fitted by the same distribution matching, but on A and B images of the
same phantoms.  This script fits the first stage (``train/tone_fit.py``, the trainer's defaults)
on, for each style pair:

* ``unpaired``: the unpaired domains (disjoint phantoms), as ``dicom-node train`` does;
* ``same content``: the paired data set's A and B (the same phantoms in both looks);
* ``same half`` / ``disjoint halves``: the paired set's first half in both domains, and its
  first half of A against its second half of B (as many images, other content);
* ``unpaired + same-content X``: the unpaired fit with one of its parts (the input tone curve,
  the band curves, the output tone curve) taken from the same-content fit;

and scores each on the held-out true pairs (affine PSNR, as ``bench/quality.py``).  Both data
sets are read through the unpaired domains' windows.  With ``--counts``, also the unpaired fit on
every disjoint set of N images per domain of one larger unpaired data set (the first N, the
next N, ...), for each N, scored on the same test pairs: how much which images a domain holds
moves the first stage, and how that shrinks with more of them (``train/tone_fit.py``,
``MAX_IMAGES``).

``python bench/first_stage_content.py --pairs denoise,unsharp,multiscale,combined,clahe``;
writes ``bench/results/first-stage-content.json``.
"""
from __future__ import annotations

import argparse
import copy
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
)

PARTS = {"input tone curve": ("tone_in",), "band curves": ("gains", "band_x", "band_y"),
         "output tone curve": ("tone_out", "out_range")}


def fit(src: list[np.ndarray], dst: list[np.ndarray]):
    """The first stage as ``dicom-node train`` fits it by default."""
    from dicom_node.train.tone_fit import fit_tone_filter

    return fit_tone_filter(src, dst, band_curves=True, brightness_bins=4, seed=0)


def score(tf, tests) -> float:
    """Affine PSNR of the first stage ``tf`` on the held-out pairs (mean over images)."""
    import torch

    with torch.no_grad():
        return float(np.mean([affine_scores(tf(torch.from_numpy(x)[None, None])[0, 0].numpy(), y)[0] for _, x, y in tests]))


def score_pair(pair: str, args: argparse.Namespace) -> dict:
    data, paired = make_data(pair, args.work, args), make_data(pair, args.work, args, paired=True)
    norms = domain_windows(data)
    tests = load_test_pairs(data, norms)
    a, b = load_domain_arrays(data / "A", norms["A"]), load_domain_arrays(data / "B", norms["B"])
    pa, pb = load_domain_arrays(paired / "A", norms["A"]), load_domain_arrays(paired / "B", norms["B"])

    unpaired, same = fit(a, b), fit(pa, pb)
    half = len(pa) // 2
    out = {"unpaired": score(unpaired, tests), "same content": score(same, tests),
           "same half": score(fit(pa[:half], pb[:half]), tests), "disjoint halves": score(fit(pa[:half], pb[half:]), tests)}
    for part, keys in PARTS.items():
        hybrid = copy.deepcopy(unpaired)
        for key in keys:
            if hasattr(hybrid, key):
                getattr(hybrid, key).copy_(getattr(same, key))
        out[f"unpaired + same-content {part}"] = score(hybrid, tests)
    out["identity"] = float(np.mean([affine_scores(x, y)[0] for _, x, y in tests]))
    return out


def by_count(pair: str, counts: list[int], args: argparse.Namespace) -> dict[str, list[float]]:
    """The unpaired first stage's score fitted on each disjoint set of N images per domain, for
    each N (module doc)."""
    from dicom_node.demo.writer import write_demo_data

    data = args.work / f"data-{pair}-count{max(counts)}"
    if not (data / "manifest.json").exists():
        write_demo_data(data, count=max(counts), test_count=args.test_count, size=args.size, seed=args.data_seed,
                        unpaired=True, style_pair=pair, source="phantom")
    norms = domain_windows(data)
    tests = load_test_pairs(data, norms)
    a, b = load_domain_arrays(data / "A", norms["A"]), load_domain_arrays(data / "B", norms["B"])
    out = {}
    for n in counts:
        out[str(n)] = []
        for first in range(0, len(a) - n + 1, n):
            out[str(n)].append(score(fit(a[first:first + n], b[first:first + n]), tests))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default="denoise,unsharp,multiscale,combined,clahe")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-quality-bins"), help="demo data (shared with quality.py)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--counts", default="", help="images per domain for the unpaired fit, e.g. 3,6,12,24,48 (empty: skip)")
    ap.add_argument("--out", type=Path, default=RESULTS / "first-stage-content.json")
    add_data_arguments(ap)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    results = {}
    for pair in args.pairs.split(","):
        results[pair] = score_pair(pair, args)
        print(f"{pair}: " + ", ".join(f"{k} {v:.2f}" for k, v in results[pair].items()), flush=True)
    counts = [int(c) for c in args.counts.split(",") if c]
    by_n = {pair: by_count(pair, counts, args) for pair in args.pairs.split(",")} if counts else {}
    write_results(args.out, args, results=results, unpaired_by_count=by_n)
    cols = list(next(iter(results.values())))
    print("\n| style pair | " + " | ".join(cols) + " |")
    print("| --- |" + " ---: |" * len(cols))
    for pair, r in results.items():
        print(f"| {pair} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |")
    if by_n:
        print("\n| style pair | " + " | ".join(f"{n} per domain: mean (min-max)" for n in counts) + " |")
        print("| --- |" + " ---: |" * len(counts))
        for pair, r in by_n.items():
            print(f"| {pair} | " + " | ".join(f"{np.mean(r[str(n)]):.2f} ({min(r[str(n)]):.2f}-{max(r[str(n)]):.2f})"
                                               for n in counts) + " |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

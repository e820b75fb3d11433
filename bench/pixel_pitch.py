"""The first stage on domains from detectors of other pixel pitches.

Why: a vendor's processing works at fixed sizes in pixels (the demo styles' band, unsharp and
denoising kernels are in pixels too), and so do the first stage's band curves.  A detector of
finer pitch puts the same anatomy into coarser bands, so two domains of other pitches differ in
more than their look.  ``dicom-node train`` resamples a B of other pixels to A's pixel size
(``data.pixel_spacing: match``, ``train/pixel_pitch.py``: a finer B averaged, a coarser one
interpolated bicubically); this script measures what a pitch difference costs and what the
resampling wins back.

For each style pair and data seed it makes ``demo-data --unpaired`` at 512 px (24 images per
domain, 6 held-out true pairs) and, with the same seed, B's images again at another size over
the same field of view (768 px: pixels 1.5x finer; 352 px: 1.45x coarser), processed in B's
style at that size, as B's own detector would.  It keeps the chests alone (one field of view,
so one pixel size per domain, as one detector gives).  It fits the first stage as the trainer
does without pairs (band curves, 4 brightness bins, 9 quantiles) from A at 512 against B at each
pitch, against B as ``dicom-node train`` loads it by default (its own decision and
resampling), and against the coarser B interpolated up bilinearly (the alternative to the
trainer's bicubic).  Every fit is scored A→B on the same
held-out chests (4 of the 6 pairs): B's style applied to A's images on A's grid, affine PSNR ("look") and plain
PSNR ("as written").

``python bench/pixel_pitch.py``; writes ``bench/results/pixel-pitch.json``.
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

BASE = 512  # A's size, and the held-out pairs'


def resampled(images: list[np.ndarray], size: int) -> list[np.ndarray]:
    """Each square image interpolated up to ``size`` x ``size`` over the same field of view, bilinearly."""
    import torch
    import torch.nn.functional as F

    out = []
    for im in images:
        t = torch.from_numpy(np.ascontiguousarray(im, np.float32))[None, None]
        out.append(F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy())
    return out


def chests(data: Path, out: Path) -> Path:
    """``data``'s chest images alone (hard links: A, B and test), one field of view and so one
    pixel size per domain, as one detector gives (the demo's knees lie on a smaller field)."""
    if not (out / "done").exists():
        for sub in ("A", "B", "test/A", "test/B"):
            if (data / sub).is_dir():
                (out / sub).mkdir(parents=True, exist_ok=True)
                for f in sorted((data / sub).glob("*_chest.dcm")):
                    if not (out / sub / f.name).exists():
                        os.link(f, out / sub / f.name)
        (out / "done").write_text("")
    return out


def score_pair(pair: str, seed: int, work: Path, sizes: list[int], count: int) -> dict:
    """Identity and the first stage fitted from A against B at each pitch, scored on the held-out chests."""
    from dicom_node.engine.tone_filter import DEFAULT_SIGMAS
    from dicom_node.train.data import find_image_files, load_domain
    from dicom_node.train.pixel_pitch import pitch_target
    from dicom_node.train.tone_fit import fit_tone_filter

    def data(size: int, test_count: int) -> Path:
        full = make_data(pair, work / f"seed{seed}-{size}",
                         argparse.Namespace(count=count, test_count=test_count, size=size, data_seed=seed))
        return chests(full, work / f"seed{seed}-{size}" / f"chests-{pair}")

    base = data(BASE, 6)
    norms = domain_windows(base)
    tests = [(x, y) for _, x, y in load_test_pairs(base, norms)]
    a = load_domain(base / "A", "A", base / ".cache", norms["A"])
    b = load_domain(base / "B", "B", base / ".cache", norms["B"])
    domains_b = {f"B at A's pitch ({BASE} px)": list(b.arrays)}  # each B's images, as the fit reads them
    targets: dict[str, float | None] = {}
    for size in sizes:
        other = data(size, 0)
        b_norm = domain_windows(other)["B"]
        pitch = f"{BASE / size:.2f}x A's pitch ({size} px)"
        as_made = list(load_domain(other / "B", "B", other / ".cache", b_norm).arrays)
        domains_b[f"B at {pitch}"] = as_made
        # what dicom-node train does by default (data.pixel_spacing: match): its own decision and averaging
        target = targets[pitch] = pitch_target(a.summary()["pixel_spacing_mm"], find_image_files(other / "B"))
        if target is not None:
            matched = load_domain(other / "B", "B", other / ".cache-matched", b_norm, pitch_to=target)
            how = " and ".join(sorted(matched.resampled))
            domains_b[f"B at {pitch}, as the trainer {how} it"] = list(matched.arrays)
        if size < BASE:  # what plain bilinear interpolation would give, against the trainer's bicubic
            domains_b[f"B at {pitch}, bilinear up (not the trainer's)"] = resampled(
                [np.asarray(x, np.float32) for x in as_made], BASE)
    look, written, gains = {}, {}, {}
    look["identity"], written["identity"] = stage_scores(None, tests)
    for name, arrays in domains_b.items():
        tf = fit_tone_filter(a.arrays, arrays, band_curves=True, brightness_bins=4, seed=0)
        look[name], written[name] = stage_scores(tf, tests)
        gains[name] = tf.describe()["band_gains_small"]  # what each band does to small coefficients
    return {"look": {k: float(np.mean(v)) for k, v in look.items()},
            "as_written": {k: float(np.mean(v)) for k, v in written.items()},
            "images": look, "images_as_written": written, "pitch_target_mm": targets,
            "band_gains_small": gains, "band_sigmas_px": list(DEFAULT_SIGMAS),
            "images_per_domain": {"A": len(a), "B": len(b), "test": len(tests)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default="multiscale,combined,clahe,denoise,unsharp")
    ap.add_argument("--count", type=int, default=24, help="images per domain")
    ap.add_argument("--seeds", default="0,1", help="data seeds: other phantoms in each")
    ap.add_argument("--sizes", default="768,352", help="B's other sizes over the same field of view")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-pixel-pitch"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "pixel-pitch.json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict = {}
    for pair in args.pairs.split(","):
        results[pair] = {}
        for seed in (int(s) for s in args.seeds.split(",")):
            r = results[pair][str(seed)] = score_pair(pair, seed, args.work, sizes, args.count)
            print(f"{pair} seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["look"].items()), flush=True)
        write_results(args.out, args, "pixel-pitch", results=results)
    names = list(next(iter(next(iter(results.values())).values()))["look"])
    print("\nMean over seeds, A→B on the held-out chests at A's pitch: look (affine PSNR) / as written (plain PSNR), dB.")
    print("| style pair | " + " | ".join(names) + " |")
    print("| --- |" + " ---: |" * len(names))
    for pair, rs in results.items():
        cells = [f"{np.mean([rs[s]['look'][n] for s in rs]):.2f} / {np.mean([rs[s]['as_written'][n] for s in rs]):.2f}"
                 for n in names]
        print(f"| {pair} | " + " | ".join(cells) + " |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

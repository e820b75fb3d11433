"""Benchmark of the seam metrics: can `dicom-node evaluate` tell seamless tiling from seams?

Runnable alone from the repository root:

    python bench/seams.py [--model default --size 1024 --count 6 --seed 0 --tiles 256,512]

For held-out demo radiographs (``dicom-node demo-data``, made in the run) and each tile size,
three tiled translations of the same model are scored with evaluate's two seam measures:

* the engine's seamless executor (``translate(..., tile=N)``),
* a naive sliding window with raised-cosine blending (``translate_naive``, overlap 0.25),
* naive hard tiles (``translate_naive``, overlap 0: tiles abut where they can).

``seam_ratio`` is :func:`dicom_node.evaluation.seam_energy` of the tiled output over that of the
whole-image pass, pooled over the images (1 without seams); the deviation is |tiled -
whole-image pass| in % of the range (the exact check, bound 0.5 % mean / 5 % max).  Prints a table last and writes
bench/results/seams.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import machine_info  # noqa: E402  (bench/ is on sys.path when run as a script)

from dicom_node.cli import main as cli  # noqa: E402
from dicom_node.engine import load_style_model, translate  # noqa: E402
from dicom_node.engine.pixels import normalize, read_dicom  # noqa: E402
from dicom_node.engine.tiling import translate_naive  # noqa: E402
from dicom_node.evaluation import compare_seams, seam_summary  # noqa: E402

METHODS = {
    "seamless executor": lambda m, x, t: (translate(m, x, tile=t, overlap=0.25), 0.25),
    "naive, blended (overlap 0.25)": lambda m, x, t: (translate_naive(m, x, tile=t, overlap=0.25), 0.25),
    "naive, hard tiles (overlap 0)": lambda m, x, t: (translate_naive(m, x, tile=t, overlap=0.0), 0.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--count", type=int, default=6, help="held-out images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiles", default="256,512")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "seams.json"))
    args = ap.parse_args()
    model = load_style_model(args.model)
    tiles = [int(t) for t in args.tiles.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        cli(["demo-data", tmp, "--count", "0", "--test-count", str(args.count), "--size", str(args.size),
             "--seed", str(args.seed)])
        files = sorted((Path(tmp) / "test" / "A").glob("*.dcm"))
        images = [normalize(read_dicom(f)[1], model.normalization) for f in files]
    wholes = [translate(model, x, tile=0) for x in images]
    rows = []
    for tile in tiles:
        for name, run in METHODS.items():
            checks = []
            for x, whole in zip(images, wholes):
                y, overlap = run(model, x, tile)
                checks.append(compare_seams(x, y, whole, tile, overlap))
            pooled = seam_summary(checks)
            rows.append({"tile": tile, "method": name,
                         "seam_ratio": round(pooled["seam_ratio"], 3),
                         "seam_ratio_per_image": [round(seam_summary([c])["seam_ratio"], 3) for c in checks],
                         "mean_deviation_pct": float(f"{pooled['seam_mean_deviation']:.3g}"),
                         "max_deviation_pct": float(f"{pooled['seam_max_deviation']:.3g}"),
                         "seamless": pooled["seamless"]})
    result = {"benchmark": "seams", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info("cpu"), "model": model.name, "model_version": model.version,
              "images": [f.name for f in files], "size": args.size, "seed": args.seed, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{len(images)} demo radiographs {args.size}^2 (seed {args.seed}), model {model.name} "
          f"v{model.version}; deviation = |tiled - whole-image pass|, % of range\n")
    print(f"{'tile':>5} | {'method':<31} | {'seam_ratio':>10} | {'per image (min..max)':>20} | "
          f"{'mean dev %':>10} | {'max dev %':>9} | seamless")
    print("-" * 110)
    for r in rows:
        lo, hi = min(r["seam_ratio_per_image"]), max(r["seam_ratio_per_image"])
        print(f"{r['tile']:>5} | {r['method']:<31} | {r['seam_ratio']:>10.2f} | {f'{lo:.2f}..{hi:.2f}':>20} | "
              f"{r['mean_deviation_pct']:>10.3g} | {r['max_deviation_pct']:>9.3g} | {r['seamless']}")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

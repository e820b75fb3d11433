"""How well the fidelity guard separates good outputs from faulty ones, and what it costs.

For each demo style pair (``--pairs``), two kinds of good model, each with its inverse:

* "PAIR": the trainer's first stage alone (the tone filter fitted from the two domains, the
  network still the identity), calibrated exactly as ``dicom-node train`` calibrates at
  export (bench/fidelity_faults.py), from disjoint phantoms: training images, calibration
  images, and held-out test images of the model's own domain;
* "PAIR trained": both directions trained by ``dicom-node train`` itself (``--trained-steps``,
  tone filter plus residual network), exported and calibrated by it: the network adds
  structure of its own, as in production.

Then:

* false alarms: the share of held-out own-domain test images flagged (goal <= 1 %);
* detection: the share of faulty outputs flagged, per injected fault (goal >= 95 %): model
  faults (painted nodule, erased edge, corrupted weights, untrained generator, inverted
  polarity), a knee-only model applied to chests, and inputs unlike the training data
  (another vendor's images, metal, a small patient, another detector);
* cost: the guard's time against the translation's on this CPU, for the bundled model at
  1024 and 2048 px (goal <= 10 %), with and without the cycle check (the input checks
  ood, noise and saturated included).

Prints a table last and writes ``bench/results/fidelity.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import fidelity_faults as ff  # noqa: E402
from bench.machine import machine_info  # noqa: E402


def _assess(model, x, inverse):
    from dicom_node.engine.fidelity import assess
    from dicom_node.engine.tiling import translate_with_base

    with torch.no_grad():
        y, base = translate_with_base(model, x, tile=0)
        return assess(model, x, y, inverse=inverse, base=base)


def _extreme(pick, reports) -> dict:
    from dicom_node.engine.fidelity import SCORES

    return {k: pick((r.scores[k] for r in reports if r.scores.get(k) is not None), default=None) for k in SCORES}


def _rate(rows: dict, label: str, name: str, kind: str, what: str, reports: list) -> None:
    """One row: how many of ``reports`` were flagged, why, and the extreme scores."""
    flagged = [r for r in reports if ff.flagged(r)]
    reasons: dict[str, int] = {}
    for r in flagged:
        for reason in r.reasons:
            key = reason.split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
    rows[name] = {"kind": kind, "what": what, "images": len(reports), "flagged": len(flagged),
                  "rate": len(flagged) / max(1, len(reports)), "reasons": reasons,
                  "scores_max": _extreme(max, reports), "scores_min": _extreme(min, reports)}
    print(f"  {label:16s} {name:24s} {len(flagged):3d}/{len(reports):3d} flagged", file=sys.stderr)


def _common_rows(label: str, kit: ff.Kit, test_a: list, faulty: int) -> dict:
    """False alarms on ``test_a`` and every model and input fault on its first ``faulty`` images."""
    ab, ba, rows = kit.ab, kit.ba, {}
    _rate(rows, label, "own domain (held out)", "false alarm", "held-out images of the model's own domain and style",
          [_assess(ab, i.x, ba) for i in test_a])
    for name, (what, make) in ff.MODEL_FAULTS.items():
        _rate(rows, label, name, "model fault", what, [_assess(make(ab, k), img.x, ba)
                                                       for k, img in enumerate(test_a[:faulty])])
    for name, (what, change) in ff.INPUT_FAULTS.items():
        _rate(rows, label, name, "input fault", what, [_assess(ab, change(img.x, k), ba)
                                                       for k, img in enumerate(test_a[:faulty])])
    return rows


def _summary(kit: ff.Kit, rows: dict, t0: float) -> dict:
    return {"thresholds": kit.ab.metadata["fidelity"]["thresholds"],
            "calibration": kit.ab.metadata["fidelity"]["calibration"], "rows": rows,
            "seconds": round(time.perf_counter() - t0, 1)}


def run_pair(pair: str, args: argparse.Namespace, trained: bool = False) -> dict:
    n, size = args.images, args.size
    t0 = time.perf_counter()
    kit = (ff.trained_pair(pair, size, n, args.calibration, args.trained_steps, args.work) if trained
           else ff.calibrated_pair(pair, size, n, args.calibration))
    label = f"{pair} trained" if trained else pair
    test_a = ff.demo_images(pair, "a", range(ff.TEST, ff.TEST + args.held_out), size)
    rows = _common_rows(label, kit, test_a, args.faulty)
    other = ff.demo_images(pair, "b", range(ff.OTHER, ff.OTHER + args.faulty), size)
    _rate(rows, label, "other vendor's images", "input fault", "images of the target style sent to the A->B model",
          [_assess(kit.ab, img.x, kit.ba) for img in other])
    knees = [i for i in kit.train_a if i.body_part == "KNEE"], [i for i in kit.train_b if i.body_part == "KNEE"]
    knee_calib = [i for i in kit.calibration_a if i.body_part == "KNEE"]
    knee = ff.calibrate(ff.tone_model([i.x for i in knees[0]], [i.x for i in knees[1]], f"{pair}_knee"), None,
                        [i.x for i in knees[0]], [i.x for i in knee_calib])
    chests = [i for i in test_a if i.body_part == "CHEST"][:args.faulty]
    _rate(rows, label, "knee model on chests", "model fault", "a model trained on knees only, given chests",
          [_assess(knee, img.x, None) for img in chests])
    return _summary(kit, rows, t0)


def run_real(args: argparse.Namespace, trained: bool = False) -> dict | None:
    """The same measures on real radiographs (bench/fidelity_faults.real_pair): a model between a
    real CR chest and the chest re-processed by the B style of ``--real-style``, test crops
    from the other half of the chest; "other vendor's images" are that half re-processed, and
    a real CR leg from another vendor's detector stands in for the knee model (another body
    part and detector).  None without the pydicom-data package."""
    from dicom_node.demo.vendor_processing import get_style_pair

    t0 = time.perf_counter()
    steps = args.trained_steps if trained else 0
    kit = ff.real_pair(args.real_style, args.real_size, args.real_images, args.real_calibration, args.real_held_out,
                       steps, args.work)
    if kit is None:
        return None
    label = "real trained" if trained else "real"
    rows = _common_rows(label, kit, kit.test_a, args.faulty)
    chest, leg = ff.real_radiograph(ff.REAL_CHEST), ff.real_radiograph(ff.REAL_LEG)
    style = get_style_pair(args.real_style).b
    other = ff.real_crops(chest, "right", args.faulty, ff.REAL_TEST + 1, args.real_size, style)
    _rate(rows, label, "other vendor's images", "input fault", "the test half re-processed in the target style",
          [_assess(kit.ab, img.x, kit.ba) for img in other])
    legs = [c for half in ("left", "right")
            for c in ff.real_crops(leg, half, args.faulty // 2, ff.REAL_TEST + 2, args.real_size, body_part="LEG")]
    _rate(rows, label, "another body part, detector", "input fault", "a real CR leg (Fuji, 10 bit) to the chest model",
          [_assess(kit.ab, img.x, kit.ba) for img in legs])
    return _summary(kit, rows, t0)


def panel(path: Path, args: argparse.Namespace) -> None:
    """docs picture: the preview banners of a good output and three faulty ones (classic pair)."""
    from PIL import Image

    from dicom_node.engine.fidelity import assess
    from dicom_node.engine.pipeline import _preview_image
    from dicom_node.engine.tiling import translate_with_base

    size = 384
    kit = ff.calibrated_pair("classic", size, args.images, args.calibration)
    ab, ba = kit.ab, kit.ba
    x = next(i for i in ff.demo_images("classic", "a", range(ff.TEST, ff.TEST + 4), size) if i.body_part == "CHEST").x
    tiles = []
    for model in (ab, ff.MODEL_FAULTS["paints a nodule"][1](ab, 1), ff.MODEL_FAULTS["erases an edge"][1](ab, 0),
                  ff.MODEL_FAULTS["inverted polarity"][1](ab, 0)):
        with torch.no_grad():
            y, base = translate_with_base(model, x, tile=0)
        tiles.append(_preview_image(x, np.clip(y, -1, 1), assess(model, x, y, inverse=ba, base=base)))
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    canvas = Image.new("RGB", (2 * w + 8, 2 * h + 8), (255, 255, 255))
    for k, t in enumerate(tiles):
        canvas.paste(t, ((k % 2) * (w + 8), (k // 2) * (h + 8)))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)


def cost(args: argparse.Namespace) -> list[dict]:
    """Median seconds of the guard and of the translation (bundled model, whole image, CPU): the
    guard as a calibrated model runs it (with network, ood, noise and saturated), and as the
    uncalibrated bundled model runs it (structure scores only).  The translation keeps its
    global stage for the network score, as the node's does (``translate_with_base``)."""
    from dicom_node.engine import fidelity as fd
    from dicom_node.engine import load_style_model
    from dicom_node.engine.model_file import StyleModel
    from dicom_node.engine.tiling import translate_with_base

    model = load_style_model("default")
    out = []
    for side in args.cost_sizes:
        img = ff.demo_images("classic", "a", [0], side)[0].x
        # The input checks need a calibrated model: a domain like the one export stores (the
        # thresholds are irrelevant here), so ood, noise and saturated are all timed.
        small = [fd.analysis_view(i.x) for i in ff.demo_images("classic", "a", range(1, 9), side)]
        domain = [{**asdict(s), "noise": fd.noise_level(x)} for s, x in zip(fd.domain_statistics(small), small)]
        calibrated = StyleModel(generator=model.generator, metadata={
            **model.metadata, "fidelity": {"domain": domain, "saturated_surround": fd.saturated_level(small),
                                           "network_scale": [0.01] * (2 * fd.LEVELS + 1)}})
        timings: dict[str, list[float]] = {"translation": [], "guard": [], "guard_structure_only": [], "cycle": []}
        for rep in range(args.repeats + 1):
            t = time.perf_counter()
            with torch.no_grad():
                y, base = translate_with_base(model, img, tile=0)
            t1 = time.perf_counter()
            fd.assess(calibrated, img, y, base=base)
            t2 = time.perf_counter()
            with torch.no_grad():
                fd.cycle_score(model, img, y)
            t3 = time.perf_counter()
            fd.assess(model, img, y)  # uncalibrated: no domain, so structure scores only
            t4 = time.perf_counter()
            if rep:  # the first run is the warm-up
                timings["translation"].append(t1 - t)
                timings["guard"].append(t2 - t1)
                timings["cycle"].append(t3 - t2)
                timings["guard_structure_only"].append(t4 - t3)
        med = {k: float(np.median(v)) for k, v in timings.items()}
        out.append({"size": side, "seconds": med, "raw": timings,
                    "guard_share": med["guard"] / med["translation"],
                    "guard_structure_only_share": med["guard_structure_only"] / med["translation"],
                    "guard_with_cycle_share": (med["guard"] + med["cycle"]) / med["translation"]})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", default="classic,edges,noise", help="demo style pairs (default classic,edges,noise)")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    ap.add_argument("--images", type=int, default=48, help="training images per domain (default 48)")
    ap.add_argument("--calibration", type=int, default=24, help="calibration images per domain (default 24)")
    ap.add_argument("--held-out", type=int, default=150, help="held-out own-domain test images (default 150)")
    ap.add_argument("--faulty", type=int, default=40, help="images per fault (default 40)")
    ap.add_argument("--cost-sizes", type=lambda s: [int(v) for v in s.split(",") if v], default=[1024, 2048],
                    help="image sides for the cost measurement (default 1024,2048; \"\" for none)")
    ap.add_argument("--trained-steps", type=int, default=800,
                    help="also measure models trained by dicom-node train for this many steps (default 800; 0: not)")
    ap.add_argument("--work", default="/tmp/dicom-node-bench-fidelity",
                    help="where the trained models and their data are kept between runs")
    ap.add_argument("--real", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure on real radiographs from the pydicom-data package when it is installed "
                         "(default on; pip install pydicom-data)")
    ap.add_argument("--real-style", default="classic", help="demo pair whose B style re-processes the real chest")
    ap.add_argument("--real-size", type=int, default=640, help="side of the real crops in pixels (default 640)")
    ap.add_argument("--real-images", type=int, default=24, help="real training crops per domain (default 24)")
    ap.add_argument("--real-calibration", type=int, default=16, help="real calibration crops (default 16)")
    ap.add_argument("--real-held-out", type=int, default=60, help="real held-out test crops (default 60)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fidelity.json"))
    ap.add_argument("--panel", metavar="PNG", help="only write the docs picture (preview banners) to PNG")
    args = ap.parse_args()
    if args.panel:
        panel(Path(args.panel), args)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = [p for p in args.pairs.split(",") if p]
    results = {"machine": machine_info(), "args": {k: v for k, v in vars(args).items() if k != "out"},
               "pairs": {}, "cost": []}
    for pair in pairs:
        results["pairs"][pair] = run_pair(pair, args)
        if args.trained_steps:
            results["pairs"][f"{pair} trained"] = run_pair(pair, args, trained=True)
    if args.real:
        for trained in (False, True) if args.trained_steps else (False,):
            real = run_real(args, trained)
            if real is None:
                print("real radiographs skipped: pip install pydicom-data", file=sys.stderr)
                break
            results["pairs"]["real trained" if trained else "real"] = real
    if args.cost_sizes:
        results["cost"] = cost(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    _table(results, list(results["pairs"]))
    return 0


def _table(results: dict, pairs: list[str]) -> None:
    names: dict[str, str] = {}  # every row name in first-seen order, with its kind
    for p in pairs:
        names.update({n: r["kind"] for n, r in results["pairs"][p]["rows"].items() if n not in names})
    print(f"\n{'':40s}" + "".join(f"{p:>16s}" for p in pairs))
    for name, kind in names.items():
        cells = []
        for p in pairs:
            r = results["pairs"][p]["rows"].get(name)
            cells.append(f"{100 * r['rate']:6.1f}% ({r['flagged']}/{r['images']})" if r else "-")
        label = ("false alarms: " if kind == "false alarm" else "detected: ") + name
        print(f"{label[:40]:40s}" + "".join(f"{c:>16s}" for c in cells))
    for c in results["cost"]:
        s = c["seconds"]
        print(f"cost at {c['size']} px: translation {s['translation']:.2f} s, guard {s['guard']:.3f} s "
              f"({100 * c['guard_share']:.1f} %; structure scores only {100 * c['guard_structure_only_share']:.1f} %), "
              f"with cycle {100 * c['guard_with_cycle_share']:.1f} %")


if __name__ == "__main__":
    raise SystemExit(main())

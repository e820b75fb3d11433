"""``dicom-node evaluate --model M PAIRS_DIR``: quality of a style model on held-out pairs."""
from __future__ import annotations

import argparse

from dicom_node.engine.defaults import DEFAULT_OVERLAP

from . import add_output

PREVIEW_NAME = "preview.png"  # evaluate --preview without a path: OUTPUT/preview.png


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "evaluate",
        help="PSNR/SSIM against the true style, identity baseline, seam metric; JSON + PNG panels",
        description="Translates each held-out input of PAIRS_DIR (a demo-data folder, using its test/, or a "
        "folder with A/ and B/) through the engine and compares it with the true target style in model "
        "space, and measures seams (tiled vs whole-image pass). Prints one JSON line and writes "
        "OUTPUT/metrics.json and OUTPUT/panels/*.png.",
    )
    p.add_argument("pairs_dir", metavar="PAIRS_DIR", nargs="?",
                   help="held-out pairs: a demo-data folder (its test/A and test/B are used) or a folder with "
                        "A/ and B/ holding the same file names (same name = same exposure in both styles)")
    p.add_argument("--model", required=True, help="style model file, or a bundled name such as 'default'")
    add_output(p, "output folder (default ./evaluation)", default="evaluation")
    p.add_argument("--tile", type=int, default=None,
                   help="tile size in pixels (default: the engine chooses; 0 = one whole-image pass)")
    p.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP,
                   help=f"tile overlap fraction (default {DEFAULT_OVERLAP:g})")
    p.add_argument("--seam-tile", type=int, default=256,
                   help="tile size of the seam check when the engine translates in one pass (default 256)")
    p.add_argument("--no-seam-check", action="store_true",
                   help="skip the second pass (whole image vs tiled) that measures seams")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many pairs")
    p.add_argument("--direction", default=None,
                   help="'A->B' or 'B->A' (default: the model's metadata, else A->B)")
    p.add_argument("--no-panels", action="store_true", help="skip the PNG panels")
    p.add_argument("--preview", nargs="?", const="", metavar="PNG",
                   help=f"also write a small input | output picture of the first pair, to OUTPUT/{PREVIEW_NAME} "
                        "(or to PNG)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from dicom_node.errors import UserError
    from dicom_node.evaluation import evaluate_model

    if args.tile is not None and args.tile < 0:
        raise UserError("--tile must be >= 0")
    if args.seam_tile < 64:
        raise UserError("--seam-tile must be >= 64")
    if not 0.0 <= args.overlap < 1.0:
        raise UserError("--overlap must be in [0, 1)")
    pairs_dir, preview = args.pairs_dir, args.preview
    if pairs_dir is None and preview and not preview.lower().endswith(".png"):
        pairs_dir, preview = preview, ""  # "--preview PAIRS_DIR": the flag, then the pairs
    if pairs_dir is None:
        raise UserError("PAIRS_DIR is required (a demo-data folder, or a folder with A/ and B/)")
    if preview == "":
        from pathlib import Path

        preview = str(Path(args.output) / PREVIEW_NAME)
    summary = evaluate_model(args.model, pairs_dir, args.output, tile=args.tile, device=args.device,
                             limit=args.limit, direction=args.direction, panels=not args.no_panels,
                             preview_path=preview, seam_check=not args.no_seam_check,
                             seam_tile=args.seam_tile, overlap=args.overlap)
    print(json.dumps(summary))
    return 0

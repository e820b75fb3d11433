"""``dicom-node evaluate --model M PAIRS_DIR``: quality of a style model on held-out pairs."""
from __future__ import annotations

import argparse

from dicom_node.engine.defaults import DEFAULT_OVERLAP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="PSNR/SSIM against the true style, identity baseline, seam metric; JSON + PNG panels",
        description="Translates each held-out input of PAIRS_DIR (a demo-data folder, using its test/, or a "
        "folder with A/ and B/) through the engine and compares it with the true target style in model "
        "space, and measures seams (tiled vs whole-image pass). Prints one JSON line and writes "
        "OUT/metrics.json and OUT/panels/*.png.",
    )
    p.add_argument("pairs_dir", metavar="PAIRS_DIR")
    p.add_argument("--model", required=True, help="style model file, or a bundled name such as 'default'")
    p.add_argument("--out", default="evaluation", help="output folder (default ./evaluation)")
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
    p.add_argument("--preview", metavar="PNG", help="also write a small input | output picture of the first pair")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from dicom_node.errors import UserError
    from dicom_node.evaluate import evaluate_model

    if args.tile is not None and args.tile < 0:
        raise UserError("--tile must be >= 0")
    if args.seam_tile < 64:
        raise UserError("--seam-tile must be >= 64")
    if not 0.0 <= args.overlap < 1.0:
        raise UserError("--overlap must be in [0, 1)")
    summary = evaluate_model(args.model, args.pairs_dir, args.out, tile=args.tile, device=args.device,
                             limit=args.limit, direction=args.direction, panels=not args.no_panels,
                             preview_path=args.preview, seam_check=not args.no_seam_check,
                             seam_tile=args.seam_tile, overlap=args.overlap)
    print(json.dumps(summary))
    return 0

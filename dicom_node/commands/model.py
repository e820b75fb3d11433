"""``dicom-node model info|init``: inspect style models, or write an untrained one."""
from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from . import add_output

if TYPE_CHECKING:
    from dicom_node.engine.model_file import StyleModel


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("model", help="inspect or create style model files",
                       description="Style model files: 'model info' prints one's metadata, 'model init' writes an "
                                   "untrained one (for tests, benchmarks and hardware checks).")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    info = msub.add_parser("info", help="print a style model's metadata",
                           description="Print a style model's metadata: name, version, direction, architecture, "
                                       "parameters, training provenance, the fidelity guard's thresholds and "
                                       "calibration, the inverse model. Loads the file (never runs code from it).")
    info.add_argument("model", help="model file, or a bundled model name such as 'default'")
    info.add_argument("--json", action="store_true", help="print the metadata as JSON")
    info.set_defaults(func=run_info)

    init = msub.add_parser("init", help="write an untrained style model (standard N(0, 0.02) init)",
                           description="Write an untrained generator (weights drawn from N(0, 0.02), or the "
                                       "identity with --residual) as a style model file: for tests, benchmarks "
                                       "and hardware checks, never for patients (its outputs are noise).")
    add_output(init, "output .safetensors file", dest="out", metavar="FILE", required=True, positional=True,
               aliases=())
    init.add_argument("--ngf", type=int, default=64, help="generator filters in the first layer (default 64)")
    init.add_argument("--blocks", type=int, default=9, help="residual blocks (default 9)")
    init.add_argument("--residual", action="store_true", help="residual generator starting at the identity")
    init.add_argument("--name", default="untrained", help="model name recorded in the metadata")
    init.add_argument("--seed", type=int, default=0,
                      help="random seed of the initial weights: same seed and sizes, same file (default 0)")
    init.set_defaults(func=run_init)


def _fidelity_summary(model: StyleModel) -> dict[str, Any]:
    """The guard's thresholds (calibrated or the defaults), its calibration and the inverse; the
    training domain's statistics are summarised by their count (they are long)."""
    from dicom_node.engine.fidelity import thresholds_of
    from dicom_node.engine.secondary_capture import device_uid

    fidelity = model.metadata.get("fidelity")
    stored: dict[str, Any] = fidelity if isinstance(fidelity, dict) else {}
    thresholds, calibrated = thresholds_of(model)
    return {"thresholds": thresholds,
            "calibrated": calibrated,
            "calibration": stored.get("calibration") if calibrated else "none: conservative default thresholds",
            "domain_images": len(stored.get("domain") or []),
            "inverse": model.metadata.get("inverse"),
            "device_uid": device_uid(model)}


def run_info(args: argparse.Namespace) -> int:
    from dicom_node.engine import load_style_model
    from dicom_node.engine.body_part import trained_body_parts
    from dicom_node.engine.pixel_spacing import trained_pixel_spacing

    model = load_style_model(args.model)
    n_params = sum(p.numel() for p in model.generator.parameters())
    meta = dict(model.metadata)
    meta["parameters"] = n_params
    meta["path"] = str(model.path)
    tone = model.generator.tone_filter
    if tone is not None:
        meta["tone_filter"] = tone.describe()
    validation = (meta.get("provenance") or {}).get("validation") or {}
    if "style_distance" in validation:  # lower is closer to the target domain's look
        meta["style_distance"] = {"output_vs_target": round(validation["style_distance"], 4),
                                  "input_vs_target": round(validation.get("style_distance_identity", float("nan")), 4)}
    exported = (meta.get("provenance") or {}).get("exported")
    if exported:  # the network, or its first stage alone when the network did not beat it
        meta["exported"] = exported
    parts = trained_body_parts(model.metadata)
    if parts:  # the fidelity guard flags inputs of any other body part (docs/fidelity.md)
        meta["trained_body_parts"] = sorted(parts)
    spacing = trained_pixel_spacing(model.metadata)
    if spacing:  # and inputs of pixels far finer or coarser than these
        meta["trained_pixel_spacing_mm"] = spacing
    meta["fidelity"] = _fidelity_summary(model)
    if args.json:
        print(json.dumps(meta, indent=2, sort_keys=True))
        return 0
    for key in sorted(meta):
        value = meta[key]
        if isinstance(value, (dict, list)):
            value = json.dumps(value, sort_keys=True)
        print(f"{key:16s} {value}")
    return 0


def run_init(args: argparse.Namespace) -> int:
    from dicom_node.engine import new_style_model, save_style_model
    from dicom_node.errors import UserError

    if args.ngf < 1 or args.blocks < 0:
        raise UserError("--ngf must be >= 1 and --blocks >= 0")
    gen = new_style_model(ngf=args.ngf, n_blocks=args.blocks, residual=args.residual, seed=args.seed)
    out = save_style_model(
        gen,
        args.out,
        name=args.name,
        version="0",
        provenance={"trained": False, "init": "normal(0, 0.02)", "seed": args.seed},
        description="untrained generator for tests, benchmarks and hardware checks",
    )
    print(f"wrote {out} (ngf {args.ngf}, {args.blocks} blocks, "
          f"{sum(p.numel() for p in gen.parameters())} parameters)")
    return 0

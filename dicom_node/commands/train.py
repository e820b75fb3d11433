"""``dicom-node train``: train a CycleGAN from two folders of radiographs and export two style models.

``dicom-node train --config FILE [overrides] [--resume]`` trains (under ``torchrun`` one
process per GPU); ``dicom-node train export RUN_DIR`` writes the style models from the newest
checkpoint of a run, e.g. to take a model out of a run that is still going.
"""
from __future__ import annotations

import argparse
from typing import Any

from dicom_node.errors import UserError

from . import add_output

# flag -> dotted config key
_OVERRIDES = {
    "steps": "train.steps", "decay_from": "train.decay_from", "patch_size": "train.patch_size",
    "batch_size": "train.batch_size", "lr": "train.lr", "seed": "train.seed", "device": "train.device",
    "amp": "train.amp", "ngf": "model.ngf", "blocks": "model.n_blocks", "out": "output.dir",
    "name": "output.name",
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("train", help="train a CycleGAN style model pair (A->B, B->A) from two image folders",
                       description="Train from a YAML config (see config/train.example.yaml); flags override it.")
    p.add_argument("--config", help="trainer YAML config")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output.dir")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--decay-from", type=int, help="override train.decay_from")
    p.add_argument("--patch-size", type=int, help="override train.patch_size")
    p.add_argument("--batch-size", type=int, help="override train.batch_size")
    p.add_argument("--lr", type=float, help="override train.lr")
    p.add_argument("--seed", type=int, help="override train.seed")
    p.add_argument("--device", help="override train.device (auto, cpu, cuda, cuda:1)")
    p.add_argument("--amp", choices=["auto", "bf16", "off"], help="override train.amp")
    p.add_argument("--ngf", type=int, help="override model.ngf")
    p.add_argument("--blocks", type=int, help="override model.n_blocks")
    add_output(p, "override output.dir (the run directory)", dest="out", metavar="RUN_DIR")
    p.add_argument("--name", help="override output.name (model name in the exported files)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key (value parsed as YAML); repeatable")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    p.set_defaults(func=run_train)
    tsub = p.add_subparsers(dest="train_command", metavar="[export]")
    exp = tsub.add_parser("export", help="write the two style models from a run's best (else newest) checkpoint",
                          description="Write the two style models (A->B, B->A) from a run's best checkpoint "
                                      "(checkpoints/best.pt: its network gained most over the first stage), else "
                                      "its newest, or --checkpoint; e.g. to take a model out of a run that is "
                                      "still going. A direction whose network does not beat its first stage is "
                                      "written as the first stage alone.")
    exp.add_argument("run_dir", help="the run directory (output.dir)")
    exp.add_argument("--checkpoint", help="a specific checkpoint file instead of the newest")
    add_output(exp, "output folder (default RUN_DIR/models)", dest="export_out")
    exp.set_defaults(func=run_export)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The dotted-key overrides given on the command line."""
    import yaml

    out: dict[str, Any] = {}
    for flag, key in _OVERRIDES.items():
        value = getattr(args, flag, None)
        if value is not None:
            if flag == "out":  # a path on the command line is relative to the working directory
                from pathlib import Path

                value = str(Path(value).resolve())
            out[key] = value
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise UserError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise UserError(f"--set {item!r}: value is not valid YAML") from None
    return out


def run_train(args: argparse.Namespace) -> int:
    if not args.config:
        raise UserError("--config FILE is required (see config/train.example.yaml)")
    from dicom_node.train.config import load_train_config
    from dicom_node.train.loop import train

    cfg = load_train_config(args.config, overrides_from_args(args))
    result = train(cfg, resume=args.resume, progress=not args.no_progress)
    for path in result.models:
        print(f"wrote {path}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dicom_node.train.export import export_models

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    paths = export_models(run_dir, Path(args.checkpoint) if args.checkpoint else None,
                          Path(args.export_out) if args.export_out else None)
    for path in paths:
        print(f"wrote {path}")
    return 0

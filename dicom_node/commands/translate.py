"""``dicom-node translate``: offline translation of DICOM files/folders to Secondary Capture files.

The same engine call as the node (``engine.pipeline.translate_file``), so what a radiologist
reviews offline is what the node would send. A bad input never stops the batch: it is
reported as one line ``path: reason`` and the exit code becomes 1.

Every output is checked by the fidelity guard (``engine.fidelity``) and reported, one JSON
line per translated input, in ``OUTDIR/fidelity.jsonl``: ``source_sop_uid``,
``output_sop_uid``, ``model``, ``verdict``, ``reasons``, ``scores``, ``thresholds`` (a
contract: keys may be added, these stay).
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.engine.defaults import CAUTION_LABEL, DEFAULT_FIDELITY_ACTION, DEFAULT_OVERLAP, FIDELITY_ACTIONS
from dicom_node.engine.devices import is_auto_device, tile_problem

from . import add_output

if TYPE_CHECKING:
    from dicom_node.engine.model_file import StyleModel
    from dicom_node.engine.pipeline import Translation

log = logging.getLogger(__name__)

# DICOMDIR files are DICOM but index a media folder; they are never images to translate.
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("translate", help="translate DICOM files or folders into Secondary Capture files",
                       description="Translate radiographs with a style model into Secondary Capture files "
                                   "named by their SOP Instance UID. Folders are searched recursively.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="DICOM files or folders (searched recursively)")
    p.add_argument("--model", required=True, help="style model file, or 'default' for the bundled model")
    add_output(p, "output folder (created if needed)", required=True)
    p.add_argument("--tile", type=int, default=None, metavar="N",
                   help="tile size in pixels for tiled inference (default: the engine chooses)")
    p.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP, metavar="F",
                   help=f"tile overlap fraction (default {DEFAULT_OVERLAP:g})")
    p.add_argument("--full-image", action="store_true", help="one whole-image pass, no tiling (same as --tile 0)")
    p.add_argument("--device", default=None, metavar="D", help="torch device: cpu, cuda, cuda:1, auto (default)")
    p.add_argument("--preview", action="store_true",
                   help="also write a PNG per image (input | output, with the fidelity verdict) into OUTDIR")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="refuse images with more pixels than this (default 64 Mi)")
    p.add_argument("--fidelity", choices=FIDELITY_ACTIONS, default=DEFAULT_FIDELITY_ACTION,
                   help="what to do with an output the fidelity guard flags: record (write it as usual), "
                        "flag (write it marked: own series, 'FIDELITY CAUTION' description, reasons in "
                        "ImageComments), withhold (write it marked into OUTDIR/withheld/) "
                        f"(default {DEFAULT_FIDELITY_ACTION}); every verdict goes to OUTDIR/fidelity.jsonl")
    p.add_argument("--inverse", default="auto", metavar="M",
                   help="the reverse style model, for the cycle check: a file, 'auto' (the model file's "
                        "inverse by weight digest, if it lies next to it; default) or 'none'")
    label = p.add_mutually_exclusive_group()
    label.add_argument("--label", default=CAUTION_LABEL, metavar="TEXT",
                       help="caution text at the start of every output's ImageComments (default: a "
                            "'not cleared for primary diagnosis' caution)")
    label.add_argument("--no-label", dest="label", action="store_const", const=None,
                       help="no caution text (a site that has cleared the outputs for diagnosis)")
    p.set_defaults(func=run)


def _looks_like_dicom(path: Path) -> bool:
    """DICOM by content (``engine.pixels.sniff_format``, the rule the trainer uses too) or
    ``*.dcm`` (so a broken ``.dcm`` is reported, not skipped); used only when scanning folders."""
    from dicom_node.engine.pixels import sniff_format

    return path.suffix.lower() == ".dcm" or sniff_format(path) == "dicom"


def _is_dicomdir(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
    except OSError:
        return False
    return path.name.upper() == "DICOMDIR" or _MEDIA_STORAGE_DIRECTORY.encode() in head


def collect_inputs(inputs: list[str], outdir: Path | None = None) -> tuple[list[Path], int]:
    """Files to translate (explicit files always; folders: DICOM-looking files) + skipped count.

    Files under ``outdir`` are never taken from a folder scan: with ``-o study/out study/`` a
    second run must not translate its own outputs.
    """
    from dicom_node.errors import UserError

    out_resolved = outdir.resolve() if outdir is not None else None
    files: list[Path] = []
    skipped = 0
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(q for q in p.rglob("*") if q.is_file()):
                if out_resolved is not None and f.resolve().is_relative_to(out_resolved):
                    continue
                if f.name.startswith(".") or not _looks_like_dicom(f) or _is_dicomdir(f):
                    skipped += 1
                    continue
                files.append(f)
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p}: no such file or folder")
    # The same file named twice (or via a folder and directly) is translated once.
    unique = list(dict.fromkeys(f.resolve() for f in files))
    by_resolved = {f.resolve(): f for f in files}
    return [by_resolved[u] for u in unique], skipped


def _load_model(name: str) -> StyleModel:
    from dicom_node.engine import load_style_model
    from dicom_node.engine.model_file import bundled_model_path, resolve_model_path
    from dicom_node.errors import UserError

    path = resolve_model_path(name)
    if not path.exists() and name == "default":
        raise UserError(f"no bundled default model is installed (expected {bundled_model_path()}); "
                        f"pass --model FILE")
    return load_style_model(path)


def fidelity_record(result: Translation, model: StyleModel, *, source_file: Path | None = None,
                    output_file: Path | None = None, action: str = DEFAULT_FIDELITY_ACTION) -> dict[str, Any]:
    """One line of ``fidelity.jsonl`` (the contract's keys first, then extras)."""
    from dicom_node.engine.secondary_capture import device_uid

    report = result.fidelity
    assert report is not None  # translate_radiograph's guard (on by default) always reports
    return {
        "source_sop_uid": str(result.sc.SourceImageSequence[0].ReferencedSOPInstanceUID),
        "output_sop_uid": str(result.sc.SOPInstanceUID),
        "model": model.name,
        "verdict": report.verdict,
        "reasons": report.reasons,
        "scores": report.scores,
        "thresholds": report.thresholds,
        "calibrated": report.calibrated,
        "action": action,
        "model_version": model.version,
        "model_weights_sha256": model.weights_sha256,
        "device_uid": device_uid(model),
        "source_file": None if source_file is None else str(source_file),
        "output_file": None if output_file is None else str(output_file),
    }


def run(args: argparse.Namespace) -> int:
    import json

    from tqdm import tqdm

    from dicom_node.engine.model_file import load_inverse
    from dicom_node.engine.pipeline import save_translation, translate_radiograph
    from dicom_node.engine.pixels import DEFAULT_MAX_PIXELS, read_dicom
    from dicom_node.errors import UserError

    if args.full_image and args.tile not in (None, 0):
        raise UserError("--full-image and --tile N contradict each other")
    tile = 0 if args.full_image else args.tile
    if tile is not None and tile_problem(tile):
        raise UserError(f"--tile {tile_problem(tile)}")
    if not 0.0 <= args.overlap < 1.0:
        raise UserError("--overlap must be in [0, 1)")
    max_pixels = DEFAULT_MAX_PIXELS if args.max_pixels is None else args.max_pixels
    if max_pixels < 1:
        raise UserError("--max-pixels must be >= 1")
    device = None if is_auto_device(args.device) else args.device

    if not getattr(args, "verbose", False):
        # pydicom warns (log + UserWarning) about every oddity of a broken file; the user gets
        # our one line per bad file instead. -v shows them.
        logging.getLogger("pydicom").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    outdir = Path(args.output)
    files, skipped = collect_inputs(args.inputs, outdir)
    if not files:
        raise UserError("no DICOM files found in the inputs")
    model = _load_model(args.model)
    inverse = load_inverse(model, args.inverse)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        report = open(outdir / "fidelity.jsonl", "w", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{outdir}: cannot create output folder ({exc.strerror})") from None

    done, refused, failed, flagged = 0, 0, 0, 0
    bar = tqdm(files, unit="image", file=sys.stderr, disable=len(files) < 2, dynamic_ncols=True)
    for path in bar:
        try:
            ds, img = read_dicom(path, max_pixels=max_pixels)
            result = translate_radiograph(model, ds, img, tile=tile, overlap=args.overlap, device=device,
                                          inverse=inverse, label=args.label, show_flag=args.fidelity != "record")
            fidelity = result.fidelity
            assert fidelity is not None  # translate_radiograph's guard (on by default) always reports
            held = args.fidelity == "withhold" and fidelity.flagged
            out = save_translation(result, outdir / "withheld" if held else outdir, preview=args.preview)
        except UserError as exc:
            refused += 1
            msg = str(exc)
            tqdm.write(msg if msg.startswith(str(path)) else f"{path}: {msg}", file=sys.stderr)
            continue
        except Exception as exc:  # noqa: BLE001 - keep going; a bug on one file must not lose the batch
            failed += 1
            log.debug("internal error on %s", path, exc_info=True)
            tqdm.write(f"{path}: internal error ({exc.__class__.__name__}: {exc})", file=sys.stderr)
            continue
        done += 1
        if fidelity.flagged:
            flagged += 1
            tqdm.write(f"{path}: fidelity guard flagged the output{' (withheld)' if held else ''}: "
                       f"{'; '.join(fidelity.reasons)}", file=sys.stderr)
        report.write(json.dumps(fidelity_record(result, model, source_file=path, output_file=out,
                                                action=args.fidelity)) + "\n")
        report.flush()
        log.debug("%s -> %s", path, out)
    bar.close()
    report.close()
    note = f", {skipped} non-DICOM files skipped" if skipped else ""
    caution = ""
    if flagged:
        where = f" (in {outdir / 'withheld'})" if args.fidelity == "withhold" else ""
        caution = f", {flagged} flagged by the fidelity guard{where}"
    print(f"translated {done} of {len(files)} files into {outdir}"
          f"{f', {refused} refused' if refused else ''}{f', {failed} failed' if failed else ''}{caution}{note}")
    if failed:
        return 2
    return 1 if refused else 0

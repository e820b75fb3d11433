"""Checkpoints of a run directory, and the two style model files exported from one.

A checkpoint is a ``torch.save`` file holding only tensors and plain values (metadata as a
JSON string), so it loads with ``torch.load(weights_only=True)``: opening a checkpoint
somebody sent you can never execute code.  Written atomically (temp file + rename).

Export writes ``models/NAME_A2B.safetensors`` and ``models/NAME_B2A.safetensors`` with
:func:`dicom_node.engine.model_file.save_style_model`, recording the data, the steps and the
config in the provenance metadata.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dicom_node.engine.atomic import atomic_write
from dicom_node.engine.errors import UserError

from .criteria import MARGIN_DB

if TYPE_CHECKING:
    import numpy as np

    from dicom_node.engine.generator import ResnetGenerator

__all__ = ["CHECKPOINT_FORMAT", "checkpoint_path", "list_checkpoints", "latest_checkpoint",
           "save_checkpoint", "load_checkpoint", "export_models", "checkpoint_normalizations",
           "best_checkpoint_path"]

log = logging.getLogger("dicom_node.train")

CHECKPOINT_FORMAT = "dicom-node-train-checkpoint"
_STEP_RE = re.compile(r"^step_(\d+)\.pt$")
KEEP_CHECKPOINTS = 3


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in ``run_dir``, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _STEP_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def best_checkpoint_path(run_dir: Path) -> Path:
    """Where a run keeps the checkpoint whose network gained most over its first stage
    (``train/selection.py``); absent for runs without a first stage or from before."""
    return Path(run_dir) / "checkpoints" / "best.pt"


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], sampler_state: str,
                    meta: dict[str, Any]) -> Path:
    """Write ``checkpoints/step_N.pt`` atomically and keep only the newest few."""
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "version": 1, "step": int(step), "state": state,
               "sampler": sampler_state, "meta": json.dumps(meta)}
    atomic_write(path, lambda tmp: torch.save(payload, tmp), durable=False)
    for _, old in list_checkpoints(run_dir)[:-KEEP_CHECKPOINTS]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); ``meta`` is decoded from JSON."""
    import pickle

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused an object: nothing of it was run
        raise UserError(f"{path}: not a dicom-node training checkpoint (it holds Python objects other than "
                        "tensors, which are never unpickled: that could run code)") from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise UserError(f"{path}: not a readable checkpoint ({first})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a dicom-node training checkpoint")
    payload["meta"] = json.loads(payload["meta"])
    return payload


def checkpoint_normalizations(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each domain's normalisation recorded in a checkpoint's ``meta``: ``normalizations``, or
    for runs from before per-domain windows the one ``normalization`` both domains used."""
    from dicom_node.engine.defaults import DEFAULT_NORMALIZATION

    norms = meta.get("normalizations")
    if isinstance(norms, dict) and "A" in norms and "B" in norms:
        return {"A": dict(norms["A"]), "B": dict(norms["B"])}
    one = dict(meta.get("normalization") or DEFAULT_NORMALIZATION)
    return {"A": one, "B": dict(one)}


def _output_metadata(target_norm: dict[str, Any]) -> dict[str, Any] | None:
    """A model's ``output`` metadata: its target domain's fixed window (outputs are written in
    that domain's values, ``engine.radiograph``); None for per-image normalisation."""
    return {"normalization": target_norm} if target_norm.get("method") == "fixed" else None


def _calibration_images(meta: dict[str, Any], run_dir: Path,
                        norms: dict[str, dict[str, Any]]) -> dict[str, list[np.ndarray]] | None:
    """Training images of both domains (from the run's cache, read through ``norms``) and
    validation images, if any; None (with a warning) when the data is no longer where the run
    found it."""
    from .data import load_domain, load_pairs

    data = meta["config"].get("data") or {}
    try:
        out = {label: load_domain(Path(data[label.lower()]), label, run_dir / "cache", norms[label],
                                  write_cache=False).arrays for label in ("A", "B")}
        pairs = load_pairs(Path(data["val"]), norms["A"], norms["B"]) if data.get("val") else []
    except (UserError, KeyError, OSError) as exc:
        log.warning("fidelity guard not calibrated (the models use its default thresholds): %s", exc)
        return None
    out["val_A"] = [a for _, a, _ in pairs]
    out["val_B"] = [b for _, _, b in pairs]
    return out


def _network_or_first_stage(gen: ResnetGenerator, meta: dict[str, Any],
                            key: str) -> tuple[ResnetGenerator, dict[str, Any]]:
    """``gen``, or its first stage alone when its network did not beat it (module doc), with
    what was exported and why (provenance ``exported``)."""
    from .networks import has_first_stage, zero_network

    direction = "a2b" if key == "g_ab" else "b2a"
    gain = (meta.get("validation") or {}).get(f"gain_{direction}")
    if gain is None or not has_first_stage(gen):
        return gen, {"stage": "network", "gain_db": None}
    # checkpoints from before gain_by were scored without a margin
    by = str(meta.get("gain_by", ""))
    margin = MARGIN_DB.get(by, 0.0)
    label = direction.upper().replace("2", "->")
    if gain > margin:
        return gen, _over_input({"stage": "network", "gain_db": round(float(gain), 3)}, meta, direction, label, gain)
    first = "tone filter" if getattr(gen, "tone_filter", None) is not None else "identity"
    log.warning("%s: the network does not beat its first stage (%+.2f dB%s): exporting the %s alone",
                label, gain, f" by {by}, {margin:.1f} dB needed" if margin else "", first)
    return zero_network(gen), _over_input({"stage": f"{first} alone", "gain_db": round(float(gain), 3),
                                           "reason": "the network did not beat its first stage at the chosen checkpoint"
                                           + (f" by the {margin:.1f} dB {by} needs" if margin else "")},
                                          meta, direction, label, 0.0)


def _over_input(note: dict[str, Any], meta: dict[str, Any], direction: str, label: str, gain: float) -> dict[str, Any]:
    """``note`` with ``over_input_db``, the exported model against the input on the true pairs
    (its first stage's ``first_stage_over_input`` plus the network's ``gain`` when the network is
    kept; ``train/selection.py``), and a warning when that is below 0 dB; unchanged without pairs."""
    first = (meta.get("validation") or {}).get(f"first_stage_over_input_{direction}")
    if first is None:
        return note
    over = float(first) + gain
    if over < 0:
        log.warning("%s: the exported model is %.2f dB worse than the input on the true pairs: check that both "
                    "domains show the same body part and field of view (docs/training.md)", label, -over)
    return {**note, "over_input_db": round(over, 3)}


def export_models(run_dir: Path, checkpoint: Path | None = None, out_dir: Path | None = None) -> list[Path]:
    """Write the A->B and B->A style models from ``checkpoint`` (default: the run's best one,
    ``checkpoints/best.pt``, else the newest).

    A direction whose network did not beat its first stage at that checkpoint (its recorded
    ``gain_*`` is not above 0 dB on true pairs, or its criterion's ``criteria.MARGIN_DB`` without
    them, ``train/selection.py``) is exported as the first stage alone,
    and its provenance says so.  Each model names the other as its inverse (by weight digest)
    and carries the fidelity guard's calibration (:mod:`.calibrate`), computed here.
    """
    from dicom_node.engine.model_file import generator_from_architecture, save_style_model, weights_digest

    from .calibrate import fidelity_metadata

    run_dir = Path(run_dir)
    if checkpoint is None and best_checkpoint_path(run_dir).exists():
        checkpoint = best_checkpoint_path(run_dir)
    if checkpoint is None:
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise UserError(f"{run_dir}: no checkpoint found (expected {run_dir}/checkpoints/step_*.pt)")
    payload = load_checkpoint(Path(checkpoint))
    meta = payload["meta"]
    step = payload["step"]
    model_cfg = meta["config"]["model"]
    name = meta.get("name") or run_dir.name
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "models"
    provenance = {
        "trained": True,
        "trainer": meta.get("trainer", "dicom-node train"),
        "steps": step,
        "data": meta.get("data", {}),
        "paired": meta.get("paired", False),
        "validation": meta.get("validation", {}),
        "losses": meta.get("losses", {}),
        "config": meta["config"],
        "checkpoint": Path(checkpoint).name,
    }
    arch = meta.get("architecture") or {  # checkpoints written before it was recorded
        "type": "resnet_generator", "ngf": model_cfg["ngf"], "n_blocks": model_cfg["n_blocks"],
        "residual": model_cfg.get("residual", False)}
    gens, stages = {}, {}
    for key in ("g_ab", "g_ba"):
        gens[key] = generator_from_architecture(arch)
        gens[key].load_state_dict(payload["state"][key])
        gens[key].eval()
        gens[key], stages[key] = _network_or_first_stage(gens[key], meta, key)
    names = {"g_ab": f"{name}_A2B", "g_ba": f"{name}_B2A"}
    digests = {k: weights_digest(g.state_dict()) for k, g in gens.items()}
    norms = checkpoint_normalizations(meta)
    images = _calibration_images(meta, run_dir, norms)
    written = []
    for key, other, direction, src, dst in (("g_ab", "g_ba", "A->B", "A", "B"), ("g_ba", "g_ab", "B->A", "B", "A")):
        fidelity = None
        if images is not None:
            fidelity = fidelity_metadata(gens[key], gens[other], images[src], images[f"val_{src}"])
        path = save_style_model(
            gens[key], out_dir / f"{names[key]}.safetensors", name=names[key], direction=direction,
            version=str(step), normalization=norms[src], output=_output_metadata(norms[dst]),
            provenance={**provenance, "exported": stages[key]},
            description=f"CycleGAN style model {direction} trained by dicom-node train ({step} steps)",
            inverse={"name": names[other], "weights_sha256": digests[other]}, fidelity=fidelity,
        )
        written.append(path)
    return written

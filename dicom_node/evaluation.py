"""Evaluate a style model on held-out pairs: PSNR, SSIM, identity baseline, seams, panels.

Why these numbers: a style model is only useful when its output is closer to the true
target style than the input itself is (the *identity baseline*, docs/training.md), and tiled
inference must not leave tile-shaped steps (the *seam ratio*).

Where the comparison happens: in **model space**.  Input and target are both read with
``engine.pixels.read_dicom`` (MONOCHROME1 mirrored to MONOCHROME2) and mapped to [-1, 1]
with ``engine.pixels.normalize`` using the *model's* windows: the input with its input window,
the target with its output window (a fixed-window model's domain B window; per-image models
use each image's 0.5..99.5 percentiles for both).  The model was trained to produce the target
style normalised exactly that way, so output and target are directly comparable.  The identity
baseline is the input's own values seen through the target's window (``engine.pixels.rewindow``).

Definitions (data range 2, the width of model space):

- ``psnr`` = 10 log10(2² / MSE), mean over images of the per-image value (dB);
- ``ssim``: Wang et al. 2004, 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, over
  the window positions fully inside the image, mean over images;
- ``identity_psnr`` / ``identity_ssim``: the same with the input in place of the output;
- seams, measured on a *tiled* pass (the engine's own tiling when it tiles, else a check
  pass with ``seam_tile`` px tiles) against a whole-image pass of the same model:
  ``seam_max_deviation`` / ``seam_mean_deviation``: max and mean |tiled - whole| in % of the
  range (max resp. mean over images; the exact check, "seamless means measured"), and
  ``seamless``: both within the engine's bound (0.5 % mean, 5 % max);
  ``seam_ratio``: energy of the model's change (output - input) stepping across the tile
  borders in the tiled pass over the same in the whole-image pass (:func:`seam_energy`):
  1 without seams, > 1 when the tiles leave steps that the whole image does not have.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from dicom_node.engine.defaults import DEFAULT_OVERLAP
from dicom_node.engine.pixels import rewindow, target_normalization
from dicom_node.engine.preview import save_png, to_u8
from dicom_node.engine.quality import DATA_RANGE, SeamCheck, compare_seams, psnr, seam_energy, seam_summary, ssim
from dicom_node.errors import UserError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

    from dicom_node.engine.model_file import StyleModel

__all__ = ["DATA_RANGE", "psnr", "ssim", "seam_energy", "SeamCheck", "compare_seams", "seam_summary", "find_pairs",
           "panel", "preview", "evaluate_model"]  # the metrics live in dicom_node.engine.quality (shared with training)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- data

def find_pairs(pairs_dir: str | Path, direction: str = "A->B") -> list[tuple[str, Path, Path]]:
    """(name, input file, target file) for every file name present in both style folders.

    ``pairs_dir`` is either a demo-data folder (its ``test/`` is used) or a folder holding
    ``A/`` and ``B/`` directly.  ``direction`` "A->B" reads A as input and B as target.
    """
    root = Path(pairs_dir)
    if (root / "test" / "A").is_dir() and (root / "test" / "B").is_dir():
        root = root / "test"
    if not ((root / "A").is_dir() and (root / "B").is_dir()):
        raise UserError(f"{pairs_dir}: expected A/ and B/ (or test/A and test/B) holding paired files")
    src, dst = _direction(direction)
    a_files = {p.relative_to(root / src).as_posix(): p for p in sorted((root / src).rglob("*")) if p.is_file()}
    pairs = []
    for name, path in a_files.items():
        target = root / dst / name
        if target.is_file():
            pairs.append((name, path, target))
    if not pairs:
        raise UserError(f"{root}: no file name is present in both {src}/ and {dst}/")
    return pairs


def _direction(direction: str) -> tuple[str, str]:
    d = direction.replace(" ", "").upper()
    if d in ("A->B", "A2B", "AB"):
        return "A", "B"
    if d in ("B->A", "B2A", "BA"):
        return "B", "A"
    raise UserError(f"unknown direction {direction!r} (expected 'A->B' or 'B->A')")


# --------------------------------------------------------------------------- panels

def _to_u8(img: np.ndarray) -> np.ndarray:
    return to_u8(np.asarray(img, np.float64))  # the panels compute in float64


def panel(inp: np.ndarray, out: np.ndarray, target: np.ndarray, max_side: int = 512) -> PILImage:
    """A PIL image: input | output | target | |output - target| (x4, so 0.25 is white).

    Model space -1..1 is shown as black..white; each view is shrunk to ``max_side``.
    """
    from PIL import Image

    diff = np.clip(np.abs(np.asarray(out, np.float64) - target) * 4.0, 0.0, 1.0) * 2.0 - 1.0
    views = [Image.fromarray(_to_u8(v)) for v in (inp, out, target, diff)]
    h, w = inp.shape
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    views = [v.resize(size, Image.Resampling.BILINEAR) if v.size != size else v for v in views]
    gap = 4
    canvas = Image.new("L", (4 * size[0] + 3 * gap, size[1]), 255)
    for i, v in enumerate(views):
        canvas.paste(v, (i * (size[0] + gap), 0))
    return canvas


def preview(inp: np.ndarray, out: np.ndarray, max_side: int = 320) -> PILImage:
    """A small PIL image: input | output (for the README), model space shown black..white."""
    from PIL import Image

    h, w = inp.shape
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    views = [Image.fromarray(_to_u8(v)).resize(size, Image.Resampling.LANCZOS) for v in (inp, out)]
    gap = 4
    canvas = Image.new("L", (2 * size[0] + gap, size[1]), 255)
    for i, v in enumerate(views):
        canvas.paste(v, (i * (size[0] + gap), 0))
    return canvas


# --------------------------------------------------------------------------- evaluation

def _effective_tile(model: StyleModel, shape: tuple[int, int], tile: int | None, device: str | None) -> int:
    """The tile size the engine uses for this image (0 = whole image)."""
    if tile is not None:
        return int(tile)
    from dicom_node.engine.tiling import planned_tile

    return planned_tile(model, shape, device=device, precision="fp32")


def _seam_check_tile(shape: tuple[int, int], seam_tile: int) -> int:
    """``seam_tile``, shrunk for small images so there are borders to look at (>= 64 px)."""
    side = min(shape)
    if seam_tile < side:
        return int(seam_tile)
    return max(64, (side // 2) // 4 * 4)


def _sig3(v: float) -> float:
    """Three significant digits (deviations span 1e-6 % to 100 %)."""
    return float(f"{v:.3g}")


def _finite(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), 4)


def evaluate_model(model_path: str | Path, pairs_dir: str | Path, out_dir: str | Path, *, tile: int | None = None,
                   device: str | None = None, limit: int | None = None, direction: str | None = None,
                   panels: bool = True, preview_path: str | Path | None = None, seam_check: bool = True,
                   seam_tile: int = 256, overlap: float = DEFAULT_OVERLAP) -> dict[str, Any]:
    """Translate every held-out input, compare with its target; write metrics.json and panels.

    The scored output is what the engine produces (``tile``: None = its own choice, as in the
    node).  With ``seam_check`` a second pass measures seams: a whole-image pass when the
    scored one was tiled, else a tiled one with ``seam_tile`` px tiles.
    ``preview_path``: also write input | output of the first pair there (small PNG).
    """
    from dicom_node.engine import load_style_model, translate

    model = load_style_model(model_path)
    direction = direction or str(model.metadata.get("direction") or "A->B")
    pairs = find_pairs(pairs_dir, direction)
    if limit:
        pairs = pairs[:limit]
    out = Path(out_dir)
    (out / "panels").mkdir(parents=True, exist_ok=True)
    norm = model.normalization
    norm_target = target_normalization(model.metadata.get("output"), norm)
    rows: list[dict[str, Any]] = []
    checks: list[SeamCheck] = []
    tiles_used: set[int] = set()
    seam_tiles: set[int] = set()
    t_total = 0.0
    for name, src, dst in pairs:
        x, t = _read_pair(name, src, dst, norm, norm_target)
        ident = rewindow(x, norm, norm_target)  # the input's own values, in the target's window
        eff = _effective_tile(model, x.shape, tile, device)
        tiles_used.add(eff)
        t0 = time.perf_counter()
        y = translate(model, x, tile=eff, overlap=overlap, device=device)
        dt = time.perf_counter() - t0
        t_total += dt
        row = {"name": name, "shape": list(x.shape), "psnr": psnr(y, t), "ssim": ssim(y, t),
               "identity_psnr": psnr(ident, t), "identity_ssim": ssim(ident, t), "tile": eff, "seconds": round(dt, 3)}
        if seam_check:
            check, s_tile = _seam_pass(model, x, y, eff, seam_tile, overlap, device)
            checks.append(check)
            seam_tiles.add(s_tile)
            row.update(seam_tile=s_tile, seam_max_deviation=_sig3(check.max_deviation),
                       seam_mean_deviation=_sig3(check.mean_deviation))
        rows.append(row)
        if preview_path is not None and len(rows) == 1:
            Path(preview_path).parent.mkdir(parents=True, exist_ok=True)
            save_png(preview(x, y), preview_path, optimize=True)
        if panels:
            panel_name = Path(name).with_suffix("").as_posix().replace("/", "_") + ".png"
            save_png(panel(x, y, t), out / "panels" / panel_name)
        log.info("%s: psnr %.2f dB (identity %.2f), ssim %.4f (identity %.4f), %.2f s%s", name, row["psnr"],
                 row["identity_psnr"], row["ssim"], row["identity_ssim"], dt,
                 f", tiled vs whole max {row['seam_max_deviation']:.2g} % of range" if seam_check else "")

    summary = _summary(model, direction, rows, checks, tiles_used, seam_tiles, t_total)
    for r in rows:
        for k in ("psnr", "ssim", "identity_psnr", "identity_ssim"):
            r[k] = _finite(r[k])
    (out / "metrics.json").write_text(json.dumps({**summary, "images": rows}, indent=2) + "\n")
    return summary


def _read_pair(name: str, src: Path, dst: Path, normalization: Mapping[str, Any] | None,
               target: Mapping[str, Any] | None) -> tuple[np.ndarray, np.ndarray]:
    """Input and target of one pair in model space (the model's input and target windows); same size."""
    from dicom_node.engine.pixels import normalize, read_dicom

    _, img_in = read_dicom(src)
    _, img_tg = read_dicom(dst)
    x, t = normalize(img_in, normalization), normalize(img_tg, target)
    if x.shape != t.shape:
        raise UserError(f"{name}: input {x.shape} and target {t.shape} differ in size")
    return x, t


def _seam_pass(model: StyleModel, x: np.ndarray, y: np.ndarray, tile: int, seam_tile: int, overlap: float,
               device: str | None) -> tuple[SeamCheck, int]:
    """Seams of the scored output ``y`` (tiled with ``tile``, or whole when 0) against a second
    pass the other way (whole image, or ``seam_tile`` px tiles); also returns the tile compared."""
    from dicom_node.engine import translate

    if tile > 0:
        tiled, s_tile, whole = y, tile, translate(model, x, tile=0, device=device)
    else:
        whole, s_tile = y, _seam_check_tile(x.shape, seam_tile)
        tiled = translate(model, x, tile=s_tile, overlap=overlap, device=device)
    return compare_seams(x, tiled, whole, s_tile, overlap), s_tile


def _summary(model: Any, direction: str, rows: list[dict[str, Any]], checks: list[SeamCheck],
             tiles_used: set[int], seam_tiles: set[int], t_total: float) -> dict[str, Any]:
    """The metrics.json header: means over the pairs, seam summary, tiles used, speed."""

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in rows]))

    def one_or_all(values: set[int]) -> int | list[int] | None:
        return None if not values else (next(iter(values)) if len(values) == 1 else sorted(values))

    seams = seam_summary(checks) if checks else {}
    return {
        "model": model.name,
        "model_version": model.version,
        "direction": direction,
        "pairs": len(rows),
        "psnr": _finite(mean("psnr")),
        "ssim": _finite(mean("ssim")),
        "identity_psnr": _finite(mean("identity_psnr")),
        "identity_ssim": _finite(mean("identity_ssim")),
        "seam_ratio": _finite(seams["seam_ratio"]) if seams else None,
        "seam_tile": one_or_all(seam_tiles),
        "seam_max_deviation": _sig3(seams["seam_max_deviation"]) if seams else None,
        "seam_mean_deviation": _sig3(seams["seam_mean_deviation"]) if seams else None,
        "seamless": seams.get("seamless"),
        "tile": one_or_all(tiles_used),
        "seconds_per_image": round(t_total / max(len(rows), 1), 3),
    }

"""Evaluate a style model on held-out pairs: PSNR, SSIM, identity baseline, seams, panels.

Why these numbers: a style model is only useful when its output is closer to the true
target style than the input itself is (the *identity baseline*, DESIGN-NOTES), and tiled
inference must not leave tile-shaped steps (the *seam ratio*).

Where the comparison happens: in **model space**.  Input and target are both read with
``engine.pixels.read_dicom`` (MONOCHROME1 mirrored to MONOCHROME2) and mapped to [-1, 1]
with ``engine.pixels.normalize`` using the *model's* normalisation (by default the
0.5..99.5 percentile window of each image).  The model was trained to produce the target
style normalised exactly that way, so output and target are directly comparable, and the
numbers do not depend on how either vendor scales its stored values.

Definitions (data range 2, the width of model space):

- ``psnr`` = 10 log10(2² / MSE), mean over images of the per-image value (dB);
- ``ssim``: Wang et al. 2004, 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, over
  the window positions fully inside the image, mean over images;
- ``identity_psnr`` / ``identity_ssim``: the same with the input in place of the output;
- ``seam_ratio``: mean squared neighbour difference of the model's *change*
  (output - input) across tile borders (rows/columns at multiples of the tile size) divided
  by the same across the lines 4 and 8 pixels beside them (same phase of the generator's
  stride-4 texture).  1.0 = no seams; a visible seam is
  > 1.5.  ``null`` when the image was translated in one pass (no tile borders).
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.errors import UserError

__all__ = ["DATA_RANGE", "psnr", "ssim", "seam_energy", "find_pairs", "panel", "preview", "evaluate_model"]

log = logging.getLogger(__name__)

DATA_RANGE = 2.0  # model space is [-1, 1]


# --------------------------------------------------------------------------- metrics

def psnr(x: np.ndarray, y: np.ndarray, data_range: float = DATA_RANGE) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical images."""
    mse = float(np.mean((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)


def _gauss_filter_valid(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation with a 1-D kernel along both axes."""
    k = len(kernel)
    rows = sum(kernel[i] * img[i:img.shape[0] - k + 1 + i, :] for i in range(k))
    return sum(kernel[i] * rows[:, i:rows.shape[1] - k + 1 + i] for i in range(k))


def ssim(x: np.ndarray, y: np.ndarray, data_range: float = DATA_RANGE) -> float:
    """Mean SSIM (Gaussian 11x11, sigma 1.5, K1 0.01, K2 0.03; valid window positions)."""
    a = np.asarray(x, np.float64)
    b = np.asarray(y, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    if min(a.shape) < 11:
        raise ValueError("SSIM needs images of at least 11x11 pixels")
    c = np.arange(11) - 5.0
    g = np.exp(-(c * c) / (2 * 1.5**2))
    g /= g.sum()
    mu_a, mu_b = _gauss_filter_valid(a, g), _gauss_filter_valid(b, g)
    saa = _gauss_filter_valid(a * a, g) - mu_a**2
    sbb = _gauss_filter_valid(b * b, g) - mu_b**2
    sab = _gauss_filter_valid(a * b, g) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return float(s.mean())


# Reference lines for a tile border: 4 and 8 pixels away on each side.  Multiples of 4 because
# the generator's two stride-2 stages leave a period-4 texture (transposed convolutions), so
# only lines in the same phase are comparable.
SEAM_REFERENCE_OFFSETS = (4, 8)


def seam_energy(change: np.ndarray, tile: int) -> tuple[float, int, float, int]:
    """Squared neighbour steps of ``change`` across tile borders vs. across the lines next to them.

    Borders are between pixel ``k*tile - 1`` and ``k*tile`` (rows and columns), the grid the
    engine's tiled executor writes.  The reference is the steps SEAM_REFERENCE_OFFSETS lines
    away on both sides: anatomy along nearby parallel lines is nearly the same, so without
    seams the ratio is ~1 whatever the image (a global "everywhere else" reference swings by
    +-40 % with the anatomy a border happens to cross).  Returns (border sum, border count,
    reference sum, reference count) so several images can be pooled before dividing.
    """
    d = np.asarray(change, np.float64)
    gx = np.diff(d, axis=1) ** 2  # gx[:, j] is the step between columns j and j+1
    gy = np.diff(d, axis=0) ** 2
    totals = [0.0, 0, 0.0, 0]
    for steps, along in ((gx, 1), (gy, 0)):
        n = steps.shape[along]
        border = np.zeros(n, bool)
        if tile > 0:
            border[np.arange(tile - 1, n, tile)] = True
        ref = np.zeros(n, bool)
        for k in SEAM_REFERENCE_OFFSETS:
            ref[:-k] |= border[k:]
            ref[k:] |= border[:-k]
        ref &= ~border
        b = steps[:, border] if along == 1 else steps[border, :]
        r = steps[:, ref] if along == 1 else steps[ref, :]
        totals[0] += float(b.sum())
        totals[1] += int(b.size)
        totals[2] += float(r.sum())
        totals[3] += int(r.size)
    return totals[0], totals[1], totals[2], totals[3]


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
    return np.clip(np.rint((np.asarray(img, np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def panel(inp: np.ndarray, out: np.ndarray, target: np.ndarray, max_side: int = 512):
    """A PIL image: input | output | target | |output - target| (x4, so 0.25 is white).

    Model space -1..1 is shown as black..white; each view is shrunk to ``max_side``.
    """
    from PIL import Image

    diff = np.clip(np.abs(np.asarray(out, np.float64) - target) * 4.0, 0.0, 1.0) * 2.0 - 1.0
    views = [Image.fromarray(_to_u8(v)) for v in (inp, out, target, diff)]
    h, w = inp.shape
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    views = [v.resize(size, Image.BILINEAR) if v.size != size else v for v in views]
    gap = 4
    canvas = Image.new("L", (4 * size[0] + 3 * gap, size[1]), 255)
    for i, v in enumerate(views):
        canvas.paste(v, (i * (size[0] + gap), 0))
    return canvas


def preview(inp: np.ndarray, out: np.ndarray, max_side: int = 320):
    """A small PIL image: input | output (for the README), model space shown black..white."""
    from PIL import Image

    h, w = inp.shape
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    views = [Image.fromarray(_to_u8(v)).resize(size, Image.LANCZOS) for v in (inp, out)]
    gap = 4
    canvas = Image.new("L", (2 * size[0] + gap, size[1]), 255)
    for i, v in enumerate(views):
        canvas.paste(v, (i * (size[0] + gap), 0))
    return canvas


# --------------------------------------------------------------------------- evaluation

def _effective_tile(model: Any, shape: tuple[int, int], tile: int | None, device: str | None) -> int:
    """The tile size the engine uses for this image (0 = whole image), for the seam metric."""
    if tile is not None:
        return int(tile)
    try:
        import torch

        from dicom_node.engine.tiling import choose_plan, resolve_device

        h, w = shape
        return int(choose_plan(model.generator, h + (-h) % 4, w + (-w) % 4, resolve_device(device),
                               torch.float32, tile=None).tile)
    except (ImportError, AttributeError, TypeError):  # an engine without plans: whole image
        return 0


def _finite(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), 4)


def evaluate_model(model_path: str | Path, pairs_dir: str | Path, out_dir: str | Path, *, tile: int | None = None,
                   device: str | None = None, limit: int | None = None, direction: str | None = None,
                   panels: bool = True, preview_path: str | Path | None = None) -> dict[str, Any]:
    """Translate every held-out input, compare with its target; write metrics.json and panels.

    ``preview_path``: also write input | output of the first pair there (small PNG).
    """
    from dicom_node.engine import load_style_model, translate
    from dicom_node.engine.pixels import normalize, read_dicom

    model = load_style_model(model_path)
    direction = direction or str(model.metadata.get("direction") or "A->B")
    pairs = find_pairs(pairs_dir, direction)
    if limit:
        pairs = pairs[:limit]
    out = Path(out_dir)
    (out / "panels").mkdir(parents=True, exist_ok=True)
    norm = model.normalization
    rows: list[dict[str, Any]] = []
    seam = np.zeros(4)
    tiles_used: set[int] = set()
    t_total = 0.0
    for name, src, dst in pairs:
        _, img_in = read_dicom(src)
        _, img_tg = read_dicom(dst)
        x, t = normalize(img_in, norm), normalize(img_tg, norm)
        if x.shape != t.shape:
            raise UserError(f"{name}: input {x.shape} and target {t.shape} differ in size")
        t0 = time.perf_counter()
        y = translate(model, x, tile=tile, device=device)
        dt = time.perf_counter() - t0
        t_total += dt
        eff = _effective_tile(model, x.shape, tile, device)
        tiles_used.add(eff)
        if eff > 0:
            seam += np.array(seam_energy(y - x, eff))
        row = {"name": name, "shape": list(x.shape), "psnr": psnr(y, t), "ssim": ssim(y, t),
               "identity_psnr": psnr(x, t), "identity_ssim": ssim(x, t), "tile": eff, "seconds": round(dt, 3)}
        rows.append(row)
        if preview_path is not None and len(rows) == 1:
            Path(preview_path).parent.mkdir(parents=True, exist_ok=True)
            preview(x, y).save(preview_path, optimize=True)
        if panels:
            panel(x, y, t).save(out / "panels" / (Path(name).with_suffix("").as_posix().replace("/", "_") + ".png"))
        log.info("%s: psnr %.2f dB (identity %.2f), ssim %.4f (identity %.4f), %.2f s", name, row["psnr"],
                 row["identity_psnr"], row["ssim"], row["identity_ssim"], dt)
    seam_ratio = None
    if seam[1] > 0 and seam[3] > 0:
        border, other = seam[0] / seam[1], seam[2] / seam[3]
        seam_ratio = 1.0 if border == 0.0 and other == 0.0 else (border / other if other > 0 else math.inf)

    def mean(key: str) -> float:
        return float(np.mean([r[key] for r in rows]))

    summary: dict[str, Any] = {
        "model": model.name,
        "model_version": model.version,
        "direction": direction,
        "pairs": len(rows),
        "psnr": _finite(mean("psnr")),
        "ssim": _finite(mean("ssim")),
        "identity_psnr": _finite(mean("identity_psnr")),
        "identity_ssim": _finite(mean("identity_ssim")),
        "seam_ratio": _finite(seam_ratio) if seam_ratio is not None else None,
        "tile": sorted(tiles_used)[0] if len(tiles_used) == 1 else sorted(tiles_used),
        "seconds_per_image": round(t_total / max(len(rows), 1), 3),
    }
    for r in rows:
        for k in ("psnr", "ssim", "identity_psnr", "identity_ssim"):
            r[k] = _finite(r[k])
    (out / "metrics.json").write_text(json.dumps({**summary, "images": rows}, indent=2) + "\n")
    return summary

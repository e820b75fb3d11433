"""Each domain's intensity window: which absolute values a trained model reads and writes.

Why one window per domain and not per image: a vendor's style is a mapping of *absolute*
values (a tone curve, then amplitude-dependent multiscale gains).  Stretching every image
between its own percentiles moves that mapping with the image's content: a crop, collimation,
a marker or a small patient shift the percentiles, and a tone curve exact in absolute values
lands somewhere else in each image (measured on real CR crops: 6-7 dB lost by the tone stage
alone).  So the trainer measures each domain's window once, over all its images, and the model
file records domain A's as its input window and domain B's as its output window
(``engine.radiograph`` states the rule the engine applies).

The window is the pooled :data:`WINDOW_PERCENTILES` of the valid pixels (modality-LUT values,
MONOCHROME2; ``engine.pixels``) of every readable image, each image weighted by its pixel
count.  Each file is summarised once by a quantile sketch (:data:`SKETCH_POINTS` quantiles),
kept in the run's cache beside the decoded images, so a resumed run or a new run on the same
folder does not decode it again to measure.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dicom_node.engine.atomic import atomic_write
from dicom_node.engine.defaults import DEFAULT_NORMALIZATION
from dicom_node.engine.errors import UserError

__all__ = ["WINDOW_PERCENTILES", "SKETCH_POINTS", "domain_window", "pooled_percentiles", "run_normalizations"]

log = logging.getLogger("dicom_node.train")

# The same robust percentiles the per-image window uses, over the whole domain.
WINDOW_PERCENTILES = (float(DEFAULT_NORMALIZATION["low"]), float(DEFAULT_NORMALIZATION["high"]))
SKETCH_POINTS = 1001  # quantiles per image: 0.1 % steps, finer than any window needs
_SKETCH_VERSION = 1


def _sketch(path: Path) -> dict[str, Any] | None:
    """``{"count", "quantiles"}`` of one file's valid pixels, None when it is unreadable."""
    from dicom_node.engine.pixels import read_image_file

    try:
        img = read_image_file(path)
    except Exception:  # noqa: BLE001 - unreadable files are skipped here and reported by load_domain
        return None
    values = img.pixels if img.valid is None else img.pixels[img.valid]
    if values.size == 0:
        return None
    q = np.quantile(values.astype(np.float64), np.linspace(0.0, 1.0, SKETCH_POINTS))
    return {"count": int(values.size), "quantiles": [float(f"{v:.9g}") for v in q]}


def pooled_percentiles(sketches: Sequence[dict[str, Any]], percentiles: Sequence[float]) -> list[float]:
    """Percentiles of all images' pixels together from their sketches: each quantile stands
    for ``count / SKETCH_POINTS`` pixels of its image (the weighted empirical distribution)."""
    values = np.concatenate([np.asarray(s["quantiles"], dtype=np.float64) for s in sketches])
    weights = np.concatenate([np.full(len(s["quantiles"]), s["count"] / len(s["quantiles"])) for s in sketches])
    order = np.argsort(values, kind="stable")
    values, weights = values[order], weights[order]
    cdf = (np.cumsum(weights) - 0.5 * weights) / weights.sum()
    return [float(np.interp(p / 100.0, cdf, values)) for p in percentiles]


def domain_window(folder: Path, label: str, cache_dir: Path, *,
                  percentiles: Sequence[float] = WINDOW_PERCENTILES) -> dict[str, Any] | None:
    """The fixed normalisation (``{"method": "fixed", "low", "high", "measured"}``) of one
    domain; None when the folder holds no readable image (``load_domain`` then says why)."""
    from .data import find_image_files

    folder = Path(folder)
    files = find_image_files(folder) if folder.is_dir() else []
    path = Path(cache_dir) / label / "window.json"
    try:
        cached = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        cached = {}
    known = cached.get("files", {}) if cached.get("version") == _SKETCH_VERSION else {}
    entries: dict[str, Any] = {}
    for f in files:
        st = f.stat()
        key = [st.st_size, st.st_mtime_ns]
        rel = f.relative_to(folder).as_posix()
        entry = known.get(rel)
        if entry is None or entry.get("key") != key:
            entry = {"key": key, "sketch": _sketch(f)}
        entries[rel] = entry
    if entries and entries != known:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps({"version": _SKETCH_VERSION, "files": entries})),
                     durable=False)
    sketches = [e["sketch"] for e in entries.values() if e["sketch"] is not None]
    if not sketches:
        return None
    low, high = pooled_percentiles(sketches, percentiles)
    if not high > low:
        raise UserError(f"domain {label} ({folder}): every image has the same value ({low:g}); "
                        f"there is no intensity window to learn from")
    return {"method": "fixed", "low": low, "high": high,
            "measured": {"percentiles": [float(p) for p in percentiles], "images": len(sketches)}}


def run_normalizations(mode: str, a: Path, b: Path, cache_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(domain A's, domain B's) normalisation for ``data.normalization`` ``mode``: fixed windows
    measured over each domain (``domain``) or each image's own percentiles (``image``)."""
    if mode == "image":
        return dict(DEFAULT_NORMALIZATION), dict(DEFAULT_NORMALIZATION)
    window_a, window_b = domain_window(a, "A", cache_dir), domain_window(b, "B", cache_dir)
    if window_a is None or window_b is None:  # a domain without readable images: load_domain reports it in one line
        return dict(DEFAULT_NORMALIZATION), dict(DEFAULT_NORMALIZATION)
    for label, w in zip("AB", (window_a, window_b)):
        log.info("domain %s: intensity window %.6g..%.6g (%g-%g percentiles of %d images together)", label,
                 w["low"], w["high"], *w["measured"]["percentiles"], w["measured"]["images"])
    return window_a, window_b

"""The size of a radiograph's pixels, from its header: one rule for the trainer and the guard.

Why: a vendor's processing works at fixed sizes in pixels (the octave bands of a multiscale
equalisation, an unsharp mask's kernel, a denoiser's window), and so do a style model's band
curves and network. A model that learnt a vendor's look on 0.15 mm pixels, given 0.10 mm ones,
treats finer anatomy as the detail it learnt and lifts or smooths other structures than the
vendor would. So the trainer records each domain's pixel sizes in the model
(``provenance.data.A.pixel_spacing_mm``) and warns when the two domains' differ, and the fidelity
guard flags an input whose pixels lie outside the sizes its model was trained on.

The rule:

* the pixel size is the first present of ImagerPixelSpacing (0018,1164: the detector's own,
  where vendors process), PixelSpacing (0028,0030) and NominalScannedPixelSpacing (0018,2010),
  the mean of its row and column values, in mm; ``None`` when none is two positive numbers up
  to 10 mm (PNG or TIFF, or a damaged header);
* a domain's pixel sizes are their smallest, median and largest;
* an input lies outside a model's sizes when it is more than :data:`SPACING_TOLERANCE` finer than
  the finest or coarser than the coarsest image of the model's input domain;
* two domains differ when one's coarsest pixels are more than :data:`SPACING_TOLERANCE` finer
  than the other's finest: sizes that overlap are one detector's, or one mix of detectors and
  examinations in both (a knee on a smaller field than a chest has finer pixels in both).
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Mapping, Sequence

from .training_data import input_domain

__all__ = ["SPACING_TOLERANCE", "finer_domain", "pixel_spacing_mm", "spacing_range", "trained_pixel_spacing",
           "unlike_domains", "unlike_pixel_spacing"]

SPACING_TOLERANCE = 1.25  # a third of an octave: detector pitches of one class (0.139 to 0.15 mm) pass
_LARGEST_MM = 10.0
_ATTRIBUTES = ("ImagerPixelSpacing", "PixelSpacing", "NominalScannedPixelSpacing")


def pixel_spacing_mm(ds: Any) -> float | None:
    """The pixel size of a DICOM data set in mm by the rule (module docstring), or None."""
    for keyword in _ATTRIBUTES:
        try:
            values = [float(v) for v in ds.get(keyword) or ()]
        except Exception:  # noqa: BLE001 - a damaged value: the next attribute
            continue
        if len(values) == 2 and all(math.isfinite(v) and 0 < v <= _LARGEST_MM for v in values):
            return (values[0] + values[1]) / 2
    return None


def spacing_range(spacings: Sequence[float | None]) -> dict[str, float] | None:
    """A domain's pixel sizes as the model records them: ``min``, ``median``, ``max`` in mm,
    or None when no image names its size."""
    known = sorted(s for s in spacings if s is not None)
    if not known:
        return None
    return {"min": round(known[0], 4), "median": round(statistics.median(known), 4), "max": round(known[-1], 4)}


def trained_pixel_spacing(metadata: Mapping[str, Any]) -> dict[str, float] | None:
    """The pixel sizes of the model's input domain in training (``A`` for an A->B model), or
    None when the model does not know them (PNG or TIFF data, models written before the trainer
    recorded them, metadata of any other shape)."""
    found = input_domain(metadata).get("pixel_spacing_mm")
    if not isinstance(found, Mapping):
        return None
    try:
        sizes = {k: float(found[k]) for k in ("min", "median", "max")}
    except (KeyError, TypeError, ValueError):
        return None
    return sizes if all(math.isfinite(v) and v > 0 for v in sizes.values()) else None


def unlike_pixel_spacing(metadata: Mapping[str, Any], spacing: float | None) -> str | None:
    """Why an input of this pixel size lies outside the sizes the model was trained on, or None
    (an input or a model that names no size is not judged)."""
    trained = trained_pixel_spacing(metadata)
    if spacing is None or trained is None:
        return None
    if trained["min"] / SPACING_TOLERANCE <= spacing <= trained["max"] * SPACING_TOLERANCE:
        return None
    sizes = f"{trained['min']:.3f} mm" if trained["min"] == trained["max"] else \
        f"{trained['min']:.3f} to {trained['max']:.3f} mm"
    return (f"pixel size {spacing:.3f} mm is outside the model's training data ({sizes}): "
            f"it processes detail at another scale")


def finer_domain(a: Mapping[str, float] | None, b: Mapping[str, float] | None) -> str | None:
    """``"A"`` or ``"B"``, the domain whose pixel sizes (:func:`spacing_range`) are all finer than
    the other's by the rule (module docstring), or None: alike, or one names none."""
    if a is None or b is None:
        return None
    if b["max"] * SPACING_TOLERANCE < a["min"]:
        return "B"
    return "A" if a["max"] * SPACING_TOLERANCE < b["min"] else None


def unlike_domains(a: Mapping[str, float] | None, b: Mapping[str, float] | None) -> str | None:
    """Why two domains' pixel sizes (:func:`spacing_range`) differ, or None when they are alike
    or one names none."""
    if a is None or b is None or finer_domain(a, b) is None:
        return None
    ratio = max(a["median"], b["median"]) / min(a["median"], b["median"])
    return (f"the domains' pixels differ in size (A {a['median']:.3f} mm, B {b['median']:.3f} mm, "
            f"{ratio:.2f}x): a style's detail processing works at fixed sizes in pixels, so the "
            f"model learns a change of scale as style; give it images of detectors of like pitch")

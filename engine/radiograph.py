"""A decoded radiograph and its model space: :class:`Radiograph`, :func:`normalize` (stored
values -> [-1, 1]) and the way back to output pixels (:func:`to_output_pixels`,
:func:`output_window`).

Part of the pixel pipeline (``engine.pixels`` describes the steps and re-exports every name).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .defaults import DEFAULT_NORMALIZATION
from .errors import UnsupportedImage, UserError

__all__ = ["DEFAULT_MAX_PIXELS", "OUTPUT_MAX", "Radiograph", "normalize", "to_output_pixels", "output_window"]

# 64 Mpixel: a 43x43 cm detector at 0.1 mm is ~18 Mpixel; anything far beyond is an error
# or an attack, and float32 working copies of it would cost several GiB.
DEFAULT_MAX_PIXELS: int = 64 * 1024 * 1024
OUTPUT_MAX = 65535  # output pixels are uint16, model space [-1, 1] -> [0, OUTPUT_MAX]


@dataclass
class Radiograph:
    """A decoded grayscale image in one convention, whatever its source format.

    ``pixels`` are float32 modality-LUT values in MONOCHROME2 polarity (higher = brighter);
    ``valid`` is False where the source marked Pixel Padding (None when every pixel is valid).
    """

    pixels: np.ndarray
    valid: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.pixels.shape  # type: ignore[return-value]


# ----------------------------------------------------------------------------- model space


def _window_values(img: Radiograph, normalization: Mapping[str, Any]) -> tuple[float, float]:
    """The two pixel values that ``normalization`` maps to -1 and +1."""
    method = str(normalization.get("method", "percentile"))
    values = img.pixels if img.valid is None else img.pixels[img.valid]
    if values.size == 0:
        raise UnsupportedImage("every pixel is padding")
    if method == "percentile":
        low = float(normalization.get("low", 0.5))
        high = float(normalization.get("high", 99.5))
        lo, hi = np.percentile(values, [low, high])
    elif method == "minmax":
        lo, hi = values.min(), values.max()
    elif method == "fixed":  # absolute values, e.g. a known detector range
        lo, hi = normalization["low"], normalization["high"]
    else:
        raise UserError(f"unknown normalization method {method!r}")
    return float(lo), float(hi)


def normalize(img: Radiograph, normalization: Mapping[str, Any] | None = None) -> np.ndarray:
    """Map a radiograph to model space: float32, the window's low..high -> -1..1.

    ``normalization`` comes from the model metadata (default: 0.5..99.5 percentile of the
    valid pixels). Values outside the window are clipped to [-1, 1] (the generator's output
    range, so that input and output live in the same space) unless ``"clip": false``.
    Padded pixels become -1 (they carry no anatomy and must not produce extreme inputs).
    """
    norm = dict(DEFAULT_NORMALIZATION if normalization is None else normalization)
    lo, hi = _window_values(img, norm)
    scale = 2.0 / (hi - lo) if hi > lo else 1.0
    # float32 throughout (a 20 Mpixel image costs 80 MB per copy, not 160); the same pixels
    # always give the same result, which is what the MONOCHROME1/2 twin property needs.
    x = img.pixels.astype(np.float32, copy=True)
    x -= np.float32(lo)
    x *= np.float32(scale)
    x -= np.float32(1.0)
    if norm.get("clip", True):
        np.clip(x, -1.0, 1.0, out=x)
    if img.valid is not None:
        x[~img.valid] = -1.0
    return x


def to_output_pixels(y: np.ndarray) -> np.ndarray:
    """Model space -> uint16 MONOCHROME2: -1..1 -> 0..65535 (clipped, rounded)."""
    out = np.clip(np.asarray(y, dtype=np.float32), -1.0, 1.0)
    out += np.float32(1.0)
    out *= np.float32(OUTPUT_MAX / 2.0)
    np.rint(out, out=out)  # float32 is exact to < 0.01 here; rounding is to the nearest level
    return out.astype(np.uint16)


def output_window(model_range: tuple[float, float] | None = None) -> tuple[float, float]:
    """(WindowCenter, WindowWidth) for the uint16 output, so it displays like the target style.

    Why the full range by default: the model was trained on the target style normalised the
    same way, so in model space the target style's own p_low..p_high percentiles are -1..1.
    Showing -1..1 as black..white therefore shows the output exactly as the target style's
    images look under the same robust auto-window. A model whose target style is usually
    displayed with a different window records it in model space as metadata
    ``output.window = [low, high]`` (e.g. [-0.9, 0.8]); pass it here.

    The DICOM linear VOI function maps ``c - 0.5 - (w - 1) / 2`` to black and
    ``c - 0.5 + (w - 1) / 2`` to white, so stored values a..b need ``w = b - a + 1`` and
    ``c = (a + b) / 2 + 0.5`` (for 0..65535: center 32768, width 65536).
    """
    low, high = (-1.0, 1.0) if model_range is None else (float(model_range[0]), float(model_range[1]))
    if not high > low:
        raise UserError(f"invalid output window {model_range!r}: high must be above low")
    a, b = ((np.clip([low, high], -1.0, 1.0) + 1.0) * (OUTPUT_MAX / 2.0)).tolist()
    return (a + b) / 2.0 + 0.5, b - a + 1.0

"""A decoded radiograph and its model space: :class:`Radiograph`, :func:`normalize` (stored
values -> [-1, 1]) and the way back to output pixels (:class:`OutputScale`,
:func:`to_output_pixels`, :func:`output_window`).

The intensity rule, one for the trainer and the engine (``engine.pixels`` for the decoding):
values are modality-LUT values (Rescale Slope/Intercept or the Modality LUT Sequence, so
BitsStored and the stored encoding do not matter) in MONOCHROME2 polarity (MONOCHROME1 mirrored
within the range of possible values); the VOI LUT/window is a display choice and ignored.  A
model maps a *window* of those values to model space [-1, 1]:

* ``fixed`` (what ``dicom-node train`` measures by default): one window per domain, robust
  percentiles of all the domain's images together.  A vendor's style is a mapping of absolute
  values, and a window that moved with each image's content (crops, collimation, markers,
  patient size) would put the same tone in a different place in every image.  The model file
  records the input window (domain A, ``normalization``) and the output window (domain B,
  ``output.normalization``): outputs are written in B's values, as B's images store them.
* ``percentile`` (models written before, or trained with ``data.normalization: image``): each
  image stretched between its own percentiles, for archives of mixed origin; outputs are
  written on the full 16-bit range, as always.

Part of the pixel pipeline (``engine.pixels`` describes the steps and re-exports every name).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .defaults import DEFAULT_NORMALIZATION
from .errors import UnsupportedImage, UserError

__all__ = ["DEFAULT_MAX_PIXELS", "OUTPUT_MAX", "Radiograph", "normalize", "to_output_pixels", "output_window",
           "OutputScale", "FULL_RANGE", "output_scale", "target_normalization", "rewindow"]

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
        return self.pixels.shape


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


def target_normalization(output: Mapping[str, Any] | None, normalization: Mapping[str, Any]) -> dict[str, Any]:
    """The normalisation of a model's target domain: its ``output.normalization`` (fixed-window
    models), else its input ``normalization`` (per-image models use one rule for both)."""
    norm = output.get("normalization") if isinstance(output, Mapping) else None
    return dict(norm) if isinstance(norm, Mapping) else dict(normalization)


def rewindow(x: np.ndarray, source: Mapping[str, Any], target: Mapping[str, Any]) -> np.ndarray:
    """Model-space ``x`` read through window ``source`` as the same *values* in window ``target``
    (clipped to [-1, 1]): what "returning the input unchanged" means in the target's model space.
    Per-image windows have no absolute values to keep: ``x`` is returned as it is."""
    if source.get("method") != "fixed" or target.get("method") != "fixed":
        return np.asarray(x, dtype=np.float32)
    s_lo, s_hi = float(source["low"]), float(source["high"])
    t_lo, t_hi = float(target["low"]), float(target["high"])
    values = s_lo + (np.asarray(x, dtype=np.float64) + 1.0) * ((s_hi - s_lo) / 2.0)
    return np.clip(2.0 * (values - t_lo) / (t_hi - t_lo) - 1.0, -1.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class OutputScale:
    """How model space [-1, 1] becomes stored uint16 output pixels.

    ``low``/``high`` are the values (modality-LUT units, as in the target domain's images) that
    model -1/+1 stand for; stored = (value - ``intercept``) / ``slope``.  When the target's
    values fit 0..65535 they are stored as they are (slope 1, no Rescale in the output, like
    the target's own images); otherwise the window is spread over 0..65535 and the output
    carries Rescale Slope/Intercept, so a viewer still reads the target's values.
    """

    low: float = 0.0
    high: float = float(OUTPUT_MAX)
    slope: float = 1.0
    intercept: float = 0.0

    @property
    def rescale(self) -> tuple[float, float] | None:
        """(RescaleIntercept, RescaleSlope) the output must carry, None when stored = value."""
        return None if (self.slope, self.intercept) == (1.0, 0.0) else (self.intercept, self.slope)

    def values(self, y: np.ndarray) -> np.ndarray:
        """Model space -> output values (float32, clipped to the window)."""
        out = np.clip(np.asarray(y, dtype=np.float32), -1.0, 1.0)
        out += np.float32(1.0)
        out *= np.float32((self.high - self.low) / 2.0)
        if self.low:
            out += np.float32(self.low)
        return out


# Models without an output window: model space on the full 16-bit range (unchanged since v1).
FULL_RANGE = OutputScale()


def output_scale(output: Mapping[str, Any] | None) -> OutputScale:
    """The :class:`OutputScale` of a model's ``output`` metadata (``normalization``: the target
    domain's fixed window); :data:`FULL_RANGE` when it has none."""
    norm = (output or {}).get("normalization") if isinstance(output, Mapping) else None
    if not isinstance(norm, Mapping) or norm.get("method") != "fixed":
        return FULL_RANGE
    low, high = float(norm["low"]), float(norm["high"])
    if not (np.isfinite(low) and np.isfinite(high) and high > low):
        raise UserError(f"invalid output window {low!r}..{high!r}: high must be above low")
    if low >= 0.0 and high <= OUTPUT_MAX:
        return OutputScale(low=low, high=high)
    return OutputScale(low=low, high=high, slope=(high - low) / OUTPUT_MAX, intercept=low)


def to_output_pixels(y: np.ndarray, scale: OutputScale = FULL_RANGE) -> np.ndarray:
    """Model space -> uint16 MONOCHROME2 stored values (clipped, rounded to the nearest level).

    With the default scale -1..1 -> 0..65535, bit for bit as before output windows existed.
    """
    out = scale.values(y)
    if scale.rescale is not None:
        out -= np.float32(scale.intercept)
        out /= np.float32(scale.slope)
    np.rint(out, out=out)  # float32 is exact to < 0.01 here; rounding is to the nearest level
    np.clip(out, 0, OUTPUT_MAX, out=out)
    return out.astype(np.uint16)


def output_window(model_range: tuple[float, float] | None = None,
                  scale: OutputScale = FULL_RANGE) -> tuple[float, float]:
    """(WindowCenter, WindowWidth) in output values, so the output displays like the target style.

    Why the whole model range by default: model space -1..1 is the target domain's window (its
    fixed window, or each image's own robust percentiles for per-image models), so showing it
    as black..white shows the output as the target's images look under that window.  A model
    whose target style is usually displayed otherwise records its window in model space as
    metadata ``output.window = [low, high]`` (e.g. [-0.9, 0.8]); pass it here.

    The DICOM linear VOI function maps ``c - 0.5 - (w - 1) / 2`` to black and
    ``c - 0.5 + (w - 1) / 2`` to white, so values a..b need ``w = b - a + 1`` and
    ``c = (a + b) / 2 + 0.5`` (for 0..65535: center 32768, width 65536).
    """
    low, high = (-1.0, 1.0) if model_range is None else (float(model_range[0]), float(model_range[1]))
    if not high > low:
        raise UserError(f"invalid output window {model_range!r}: high must be above low")
    a, b = scale.values(np.array([low, high], dtype=np.float32)).astype(np.float64).tolist()
    return (a + b) / 2.0 + 0.5, b - a + 1.0

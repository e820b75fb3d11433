"""One image through the whole engine: decode -> normalise -> translate -> SC dataset/file.

The node (per received instance) and ``dicom-node translate`` (per file) both call this, so
they produce the same pixels and the same UIDs for the same input and model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from .atomic import atomic_write
from .defaults import CAUTION_LABEL, DEFAULT_OVERLAP, UID_RE
from .pixels import (
    OutputScale,
    Radiograph,
    normalize,
    output_scale,
    output_window,
    to_output_pixels,
)
from .preview import save_png, to_u8
from .secondary_capture import make_secondary_capture

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

    from .fidelity import FidelityReport
    from .model_file import StyleModel
    from .secondary_capture import SeriesNaming

__all__ = ["save_translation", "save_preview", "Translation",
           "translate_radiograph", "model_output_window", "model_output_scale", "ModelOutputError"]



class ModelOutputError(RuntimeError):
    """The generator returned something that is not an image (NaN/inf, wrong shape): a bug or a
    broken model file, never a property of the input, so it is not an UnsupportedImage."""


@dataclass
class Translation:
    """Everything one translation produced (the SC plus the model-space images, for previews)."""

    sc: Dataset
    model_input: np.ndarray
    model_output: np.ndarray
    fidelity: "FidelityReport | None" = None


def model_output_scale(model: "StyleModel") -> OutputScale:
    """How this model's outputs are stored: in its target domain's values (metadata
    ``output.normalization``), or on the full 16-bit range for models without one."""
    return output_scale(model.metadata.get("output"))


def model_output_window(model: "StyleModel") -> tuple[float, float]:
    """The SC window for this model, in output values: metadata ``output.window`` (model space)
    or the whole target window."""
    output: Any = model.metadata.get("output") or {}
    window = output.get("window") if isinstance(output, dict) else None
    return output_window(tuple(window) if window else None, model_output_scale(model))


def translate_radiograph(model: "StyleModel", source: Dataset, img: Radiograph, *, tile: int | None = None,
                         overlap: float = DEFAULT_OVERLAP, device: Any = None, guard: bool = True,
                         inverse: "StyleModel | None" = None, label: str | None = CAUTION_LABEL,
                         show_flag: bool = True, series: "SeriesNaming | None" = None) -> Translation:
    """Translate an already decoded image of ``source``; padded pixels come out black (0).

    With ``guard`` (the default) the fidelity guard (``engine.fidelity``) checks the output
    against the source, with ``inverse`` for the cycle score; ``show_flag`` marks a flagged
    output visibly (its own series, a SeriesDescription prefix, the reasons in ImageComments).
    ``label`` is the caution every output carries (None: none); ``series``: how the caller
    names the output series (``secondary_capture.SeriesNaming``; None: the defaults).
    """
    from .tiling import translate_with_base

    x = normalize(img, model.normalization)
    y, base = translate_with_base(model, x, tile=tile, overlap=overlap, device=device)
    if y.shape != x.shape or not np.isfinite(y).all():
        # A broken model (NaN weights, fp16 overflow) must fail loudly, never ship a black image.
        raise ModelOutputError(f"style model {model.name!r} produced "
                               f"{'a wrong shape' if y.shape != x.shape else 'non-finite values'}")
    report = None
    if guard:
        from .body_part import examined_body_part
        from .fidelity import assess
        from .pixel_spacing import pixel_spacing_mm

        report = assess(model, x, y, valid=img.valid, inverse=inverse, device=device, base=base,
                        body_part=examined_body_part(source), pixel_spacing=pixel_spacing_mm(source))
    scale = model_output_scale(model)
    out = to_output_pixels(y, scale)
    if img.valid is not None:
        out[~img.valid] = 0
    sc = make_secondary_capture(source, out, model, window=model_output_window(model), rescale=scale.rescale,
                                label=label, fidelity=report, show_flag=show_flag, series=series)
    return Translation(sc=sc, model_input=x, model_output=y, fidelity=report)


def output_filename(sc: Dataset, suffix: str = ".dcm") -> str:
    """File name from the SOP Instance UID, validated so it can never escape the folder."""
    uid = str(sc.SOPInstanceUID)
    if not UID_RE.match(uid) or not UID(uid).is_valid:
        raise ValueError(f"refusing to use invalid SOP Instance UID {uid!r} as a file name")
    return uid + suffix


def save_translation(result: Translation, outdir: str | os.PathLike[str], *, preview: bool = False) -> Path:
    """Write ``result``'s SC as ``outdir/<SOP Instance UID>.dcm`` (atomically), and its preview PNG."""
    out_dir = Path(outdir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / output_filename(result.sc)
    atomic_write(target, lambda tmp: result.sc.save_as(tmp, enforce_file_format=True), durable=False)
    if preview:
        save_preview(result, target.with_suffix(".png"))
    return target


def save_preview(result: Translation, path: str | os.PathLike[str], *, max_height: int = 1024) -> Path:
    """Write ``result``'s preview (input | output under the fidelity banner) as a PNG, atomically;
    the node's console keeps small ones (``max_height``) of every translation."""
    image = _preview_image(result.model_input, result.model_output, result.fidelity, max_height=max_height)
    atomic_write(Path(path), lambda tmp: save_png(image, tmp), durable=False)
    return Path(path)


def _preview_image(x: np.ndarray, y: np.ndarray, report: "FidelityReport | None" = None,
                   max_height: int = 1024) -> PILImage:
    """An 8-bit RGB PNG-able image: model input | model output, both shown over -1..1, under a
    banner with the fidelity verdict (green ok, red flagged with its reasons and a ring
    around the worst region of the output)."""
    from PIL import Image, ImageDraw

    h, w = x.shape
    gap = np.full((h, max(4, w // 100)), 255, dtype=np.uint8)
    im = Image.fromarray(np.hstack([to_u8(x), gap, to_u8(y)]), mode="L").convert("RGB")
    if h > max_height:
        im = im.resize((round(im.width * max_height / h), max_height), Image.Resampling.BILINEAR)
    if report is None:
        return im
    scale = im.height / h
    red, green = (220, 30, 30), (30, 160, 60)
    if report.flagged and report.worst_region is not None:
        r, c = report.worst_region
        cx, cy = (w + gap.shape[1] + c) * scale, r * scale
        rad = max(12.0, 0.06 * im.height)
        ImageDraw.Draw(im).ellipse((cx - rad, cy - rad, cx + rad, cy + rad), outline=red, width=3)
    banner_h = 22
    canvas = Image.new("RGB", (im.width, im.height + banner_h), red if report.flagged else green)
    canvas.paste(im, (0, banner_h))
    text = ("FIDELITY GUARD: " + report.summary())[:240]
    ImageDraw.Draw(canvas).text((6, 5), text, fill=(255, 255, 255))
    return canvas

"""Preview images: model space -> 8-bit grey, written as PNG.

The one conversion used by ``translate --preview`` (engine.pipeline), the evaluation panels
(``dicom_node.evaluation``) and the trainer's sample images (``train/loop.py``).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["to_u8", "save_png"]


def to_u8(image: np.ndarray) -> np.ndarray:
    """Model space -1..1 -> uint8 0..255 (clipped, rounded to the nearest level).

    Computed in the image's own precision (float32 stays float32), so the same array always
    gives the same levels; pass a float64 array for float64 arithmetic.
    """
    x = np.clip(np.asarray(image), -1.0, 1.0)
    levels: np.ndarray = np.rint((x + 1.0) * 127.5).astype(np.uint8)
    return levels


def save_png(image: Any, path: str | os.PathLike[str], *, optimize: bool = False) -> None:
    """Write a uint8 grey array (see :func:`to_u8`) or a PIL image to ``path`` as PNG.

    The format is given explicitly, so ``path`` may be a temporary name (``atomic_write``).
    """
    from PIL import Image

    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    im.save(path, "PNG", optimize=optimize)

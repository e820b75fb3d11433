"""Seamless tiled inference (placeholder: whole-image pass only; the tiled executor replaces this)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .model_file import StyleModel


def translate(model: StyleModel, image: np.ndarray, *, tile: int | None = None, overlap: float = 0.25,
              device: str | torch.device | None = None) -> np.ndarray:
    """Translate a 2-D float32 image in model space [-1, 1]; returns the same shape."""
    if image.ndim != 2:
        raise ValueError("image must be 2-D")
    h, w = image.shape
    ph, pw = (-h) % 4, (-w) % 4
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
    with torch.inference_mode():
        y = model.generator(x)
    return y[0, 0, :h, :w].numpy().copy()

"""Validation: PSNR/SSIM of whole images translated through the engine against the true style.

Images go through ``dicom_node.engine.translate`` (the same path the node uses, tiling
included), so the numbers describe what a radiologist will see.  Metrics are computed in model
space ([-1, 1], data range 2).  The identity baseline (returning the input unchanged) is
logged next to them, because a style model is only useful when it beats it (docs/training.md).
The metric definitions are ``dicom-node evaluate``'s, so the numbers compare directly.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dicom_node.engine.quality import psnr, ssim  # the same definitions as ``dicom-node evaluate``

if TYPE_CHECKING:
    from dicom_node.engine.generator import ResnetGenerator
    from dicom_node.engine.model_file import StyleModel
    from dicom_node.engine.style_stats import StyleStats

__all__ = ["validate", "frozen_model"]


def frozen_model(gen: ResnetGenerator, name: str) -> StyleModel:
    """A frozen copy of a training generator as a StyleModel (eval mode, no gradients), to run
    through the engine as the node does without touching the one being trained."""
    from dicom_node.engine.model_file import StyleModel

    g = copy.deepcopy(gen).eval()
    g.requires_grad_(False)
    return StyleModel(generator=g, metadata={"name": name})


def validate(g_ab: ResnetGenerator, g_ba: ResnetGenerator, pairs: list[tuple[str, np.ndarray, np.ndarray]],
             device: torch.device | str | None = None, norms: dict[str, dict[str, Any]] | None = None) -> dict[str, float]:
    """Mean PSNR/SSIM of A->B against B and B->A against A, plus the identity baselines.

    ``norms``: each domain's window (``{"A": ..., "B": ...}``); the identity baseline is A's
    values seen through B's window (``engine.pixels.rewindow``).
    """
    from dicom_node.engine import translate
    from dicom_node.engine.pixels import rewindow

    models = {key: frozen_model(gen, f"validation-{key}") for key, gen in (("a2b", g_ab), ("b2a", g_ba))}
    sums: dict[str, float] = {}
    for _name, img_a, img_b in pairs:
        out_ab = translate(models["a2b"], img_a, device=device)
        out_ba = translate(models["b2a"], img_b, device=device)
        ident = rewindow(img_a, norms["A"], norms["B"]) if norms else img_a
        values = {
            "val_psnr_a2b": psnr(out_ab, img_b), "val_ssim_a2b": ssim(out_ab, img_b),
            "val_psnr_b2a": psnr(out_ba, img_a), "val_ssim_b2a": ssim(out_ba, img_a),
            "val_psnr_identity": psnr(ident, img_b), "val_ssim_identity": ssim(ident, img_b),
        }
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
    return {k: v / len(pairs) for k, v in sums.items()}


STYLE_IMAGES = 4  # training images of each domain whose style statistics are compared


def style_check(g_ab: ResnetGenerator, a_images: list[np.ndarray], b_stats: StyleStats, identity: float | None = None,
                device: torch.device | str | None = None) -> dict[str, float]:
    """Validation without pairs: style distance of G(A) from B, next to A's own (the baseline).

    G runs on whole images through the engine, as at inference.  See
    :mod:`dicom_node.engine.style_stats` for the statistics and the distance.
    """
    from dicom_node.engine import translate
    from dicom_node.engine.style_stats import style_distance, style_statistics

    model = frozen_model(g_ab, "validation-a2b")
    out = [translate(model, img, device=device) for img in a_images]
    d = style_distance(style_statistics(out), b_stats)
    result = {"style_distance": d["total"], "style_intensity": d["intensity"], "style_contrast": d["contrast"],
              "style_noise": d["noise"]}
    if identity is not None:
        result["style_distance_identity"] = identity
    return result

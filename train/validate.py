"""Validation: PSNR/SSIM of whole images translated through the engine against the true style.

Images go through ``dicom_node.engine.translate`` (the same path the node uses, tiling
included), so the numbers describe what a radiologist will see.  Metrics are computed in model
space ([-1, 1], data range 2).  The identity baseline (returning the input unchanged) is
logged next to them, because a style model is only useful when it beats it (DESIGN-NOTES).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "validate"]

DATA_RANGE = 2.0


def psnr(x: np.ndarray, y: np.ndarray, data_range: float = DATA_RANGE) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical images)."""
    mse = float(np.mean((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range**2 / mse)


def ssim(x: np.ndarray, y: np.ndarray, data_range: float = DATA_RANGE) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03)."""
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = (g / g.sum())
    w = (g[:, None] * g[None, :])[None, None]
    a = torch.as_tensor(np.asarray(x), dtype=torch.float64)[None, None]
    b = torch.as_tensor(np.asarray(y), dtype=torch.float64)[None, None]
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    saa = F.conv2d(a * a, w) - mu_a**2
    sbb = F.conv2d(b * b, w) - mu_b**2
    sab = F.conv2d(a * b, w) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return float(s.mean())


def validate(g_ab: torch.nn.Module, g_ba: torch.nn.Module, pairs: list[tuple[str, np.ndarray, np.ndarray]],
             device: torch.device | str | None = None) -> dict[str, float]:
    """Mean PSNR/SSIM of A->B against B and B->A against A, plus the identity baselines."""
    from dicom_node.engine import translate
    from dicom_node.engine.model_file import StyleModel

    models = {}
    for key, gen in (("a2b", g_ab), ("b2a", g_ba)):
        g = copy.deepcopy(gen).eval()
        g.requires_grad_(False)
        models[key] = StyleModel(generator=g, metadata={"name": f"validation-{key}"})
    sums: dict[str, float] = {}
    for _name, img_a, img_b in pairs:
        out_ab = translate(models["a2b"], img_a, device=device)
        out_ba = translate(models["b2a"], img_b, device=device)
        values = {
            "val_psnr_a2b": psnr(out_ab, img_b), "val_ssim_a2b": ssim(out_ab, img_b),
            "val_psnr_b2a": psnr(out_ba, img_a), "val_ssim_b2a": ssim(out_ba, img_a),
            "val_psnr_identity": psnr(img_a, img_b), "val_ssim_identity": ssim(img_a, img_b),
        }
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
    return {k: v / len(pairs) for k, v in sums.items()}

"""What a training run writes as it goes: ``metrics.csv``, TensorBoard scalars, sample panels.

Why a module of its own: the step loop decides *when* to record; this decides *what* a row and
a panel look like, so the CSV columns (which people plot and scripts read) are named in one
place.  TensorBoard is optional: the CSV is always written.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cyclegan import LOSS_NAMES, CycleGAN

__all__ = ["RunLog", "CSV_COLUMNS", "VAL_KEYS"]

VAL_KEYS = ("val_psnr_a2b", "val_ssim_a2b", "val_psnr_b2a", "val_ssim_b2a", "val_psnr_identity", "val_ssim_identity",
            "style_distance", "style_distance_identity", "style_intensity", "style_contrast", "style_noise",
            "gain_a2b", "gain_b2a")
CSV_COLUMNS = ("step", "elapsed_s", "lr", *LOSS_NAMES, "patches_per_s", *VAL_KEYS)


class RunLog:
    """``run_dir/metrics.csv`` (and ``tensorboard/`` when installed) and ``run_dir/samples``."""

    def __init__(self, run_dir: Path, start: int) -> None:
        """Start metrics.csv, or on resume keep only the rows logged up to the checkpoint ``start``."""
        self.path = run_dir / "metrics.csv"
        self.samples = run_dir / "samples"
        rows = []
        if start > 0 and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= start]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        self.tb: Any = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:  # noqa: BLE001 - tensorboard is optional
            self.tb = None

    def write(self, row: dict[str, Any]) -> None:
        """One row: floats to 6 significant digits, keys outside :data:`CSV_COLUMNS` left out."""
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("step", "elapsed_s") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def write_sample(self, model: CycleGAN, batch: tuple[np.ndarray, np.ndarray], step: int) -> None:
        """``samples/step_N.png``: A | G(A) | F(G(A)) over B | F(B) | G(F(B)), one pair of rows a patch."""
        from dicom_node.engine.preview import save_png, to_u8

        a, b = batch
        out = model.translate_both(torch.from_numpy(a), torch.from_numpy(b))
        rows = []
        for i in range(a.shape[0]):
            rows.append(np.concatenate([out[k][i, 0].numpy() for k in ("a", "g_a", "f_g_a")], axis=1))
            rows.append(np.concatenate([out[k][i, 0].numpy() for k in ("b", "f_b", "g_f_b")], axis=1))
        path = self.samples / f"step_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(to_u8(np.concatenate(rows, axis=0)), path)

"""Demo style pairs for the tone-stage tests: unpaired domains read as the trainer reads them."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def demo_domains(folder: Path, style_pair: str, *, count: int, test_count: int, size: int
                 ) -> tuple[list[np.ndarray], list[np.ndarray], list[tuple[str, np.ndarray, np.ndarray]]]:
    """``demo-data --unpaired`` for ``style_pair`` (data seed 0) in ``folder``: domain A's and B's
    images, each through its domain's fixed window, and the held-out true pairs."""
    from dicom_node.demo.writer import write_demo_data
    from dicom_node.engine.pixels import normalize, read_image_file
    from dicom_node.train.data import find_image_files, load_pairs
    from dicom_node.train.intensity import run_normalizations

    write_demo_data(folder, count=count, test_count=test_count, size=size, seed=0, unpaired=True,
                    style_pair=style_pair)
    norm_a, norm_b = run_normalizations("domain", folder / "A", folder / "B", folder / ".windows")
    a, b = ([np.asarray(normalize(read_image_file(f), norm), np.float32) for f in find_image_files(folder / d)]
            for d, norm in (("A", norm_a), ("B", norm_b)))
    return a, b, load_pairs(folder / "test", norm_a, norm_b, limit=1000)


def affine_psnr(out: np.ndarray, target: np.ndarray) -> float:
    """PSNR in model space (data range 2) after the least-squares gain and offset of ``out``
    onto ``target``, as bench/quality.py scores."""
    design = np.stack([out.ravel(), np.ones(out.size)], 1).astype(np.float64)
    coef = np.linalg.lstsq(design, target.ravel().astype(np.float64), rcond=None)[0]
    return float(10 * np.log10(4.0 / np.mean((design @ coef - target.ravel()) ** 2)))

"""Collimated borders left out of the first stage's fit (train/collimation.py)."""
from __future__ import annotations

import numpy as np
import pytest

from dicom_node.train.collimation import SOFT_EDGE, collimated_borders, without_collimation


def textured(seed: int, shape: tuple[int, int] = (200, 240)) -> np.ndarray:
    """Anatomy-like texture in model space (bone bright), away from the top of the range."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    return (0.4 * np.sin(x / 9.0) * np.cos(y / 13.0) + 0.1 * rng.standard_normal(shape)).astype(np.float32)


def test_bright_flat_bands_along_the_edges_are_found_and_cut_with_their_soft_edge():
    img = textured(0)
    rng = np.random.default_rng(1)
    img[:30] = 0.97 + 0.003 * rng.standard_normal((30, img.shape[1]))  # unexposed detector: bright, flat
    img[:, -45:] = 0.97 + 0.003 * rng.standard_normal((img.shape[0], 45))
    top, bottom, left, right = collimated_borders(img)
    assert (top, bottom, left, right) == (30 + SOFT_EDGE, 0, 0, 45 + SOFT_EDGE)
    assert without_collimation(img).shape == (200 - 30 - SOFT_EDGE, 240 - 45 - SOFT_EDGE)


def test_images_without_borders_and_dark_backgrounds_are_kept_whole():
    img = textured(2)
    assert collimated_borders(img) == (0, 0, 0, 0) and without_collimation(img) is not None
    img[:, :60] = -1.0  # direct exposure beside the body: dark and flat, part of the style's range
    assert collimated_borders(img) == (0, 0, 0, 0)
    img = np.full((64, 64), 0.5, np.float32)  # a flat image is not all border: at most a third a side
    assert all(w <= 64 // 3 for w in collimated_borders(img))


def test_the_demo_crops_collimator_borders_are_found():
    """Crops of real radiographs with the demo's collimator borders (demo/real_crops.py): each
    recorded border is found, at least as wide as recorded and at most the soft edge wider."""
    pytest.importorskip("pydicom.data")
    from dicom_node.demo.real_crops import load_real_sources, real_crop

    sources = load_real_sources()
    checked = extra = 0
    for index in range(12):
        source = sources[index % len(sources)]
        crop, info = real_crop(source, "a", 384, np.random.default_rng([7, index, 2]))
        image = (crop / source.full_scale * 2 - 1).astype(np.float32)  # the fixed window, bone bright
        found = dict(zip(("top", "bottom", "left", "right"), collimated_borders(image)))
        recorded = dict(info["collimator"])
        for side, width in found.items():
            if side in recorded:
                assert recorded[side] <= width <= recorded[side] + SOFT_EDGE + 3, (index, side, recorded, found)
                checked += 1
            else:
                extra += width > 0
    assert checked >= 8 and extra <= 2, (checked, extra)

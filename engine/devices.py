"""Which devices and tile sizes the engine accepts: one rule each, read by the config schema,
the command line and the engine itself (light: no torch).
"""
from __future__ import annotations

import re
from typing import Any

__all__ = ["DEVICE_CHOICES", "device_problem", "is_auto_device", "MIN_TILE", "MIN_USER_TILE", "tile_problem"]

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")

# Smallest tile the executor can run (every reflection pad needs this much map), and the smallest
# a user may configure (config, CLI): below it a tile is mostly halo, and the planner never picks one.
MIN_TILE = 16
MIN_USER_TILE = 64


def is_auto_device(device: Any) -> bool:
    """None, "" and "auto" (any case, surrounding spaces) mean: CUDA when available, else the CPU."""
    return device is None or (isinstance(device, str) and device.strip().lower() in ("", "auto"))


def device_problem(device: Any) -> str | None:
    """Why ``device`` is not a device name the engine accepts, or None (whether the machine has
    it is checked when the engine resolves it)."""
    if is_auto_device(device):
        return None
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        return f"must be {DEVICE_CHOICES}, not {device!r}"
    return None


def tile_problem(tile: Any, minimum: int = MIN_USER_TILE) -> str | None:
    """Why ``tile`` is not a tile size (0 = whole image, else at least ``minimum`` px), or None."""
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 0:
        return f"must be a non-negative integer, got {tile!r}"
    if 0 < tile < minimum:
        return f"must be 0 (whole image) or >= {minimum} pixels"
    return None

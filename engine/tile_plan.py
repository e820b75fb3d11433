"""The memory planner: whole image or tiles, which tile size, where the full-image maps live.

The byte estimates are deliberately rough and conservative: they only decide between modes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .tile_geometry import round_up

__all__ = ["MEMORY_FRACTION", "TILE_CANDIDATES", "Plan", "choose_plan", "default_cap", "whole_bytes",
           "storage_bytes", "tile_bytes"]

# Fraction of free accelerator memory (or available host memory on CPU) the engine may use.
MEMORY_FRACTION = float(os.environ.get("DICOM_NODE_MEMORY_FRACTION", "0.6"))
# Tile sizes tried (largest first) when the engine chooses and the whole image does not fit.
TILE_CANDIDATES = (2048, 1536, 1024, 768, 512, 384, 256, 192, 128, 96, 64)


@dataclass
class Plan:
    """What the engine will do for one image: ``tile`` 0 = whole-image pass."""

    tile: int
    storage_device: torch.device
    batch: int  # tiles per convolution call
    cap: int  # bytes
    estimate: int  # bytes the chosen mode is expected to need on the compute device


def choose_plan(
    gen: nn.Module,
    h: int,
    w: int,
    device: torch.device,
    cdtype: torch.dtype,
    *,
    tile: int | None,
    memory_cap: int | None = None,
) -> Plan:
    """Pick whole image vs. tile size and where the full-image maps live, from a memory cap.

    The estimates are deliberately rough and conservative: they only decide between modes.
    """
    cap = int(memory_cap) if memory_cap else default_cap(device)
    ngf = int(getattr(gen, "ngf", 64))
    eb = torch.finfo(cdtype).bits // 8
    whole = whole_bytes(ngf, h, w, eb)
    if tile == 0 or (tile is None and whole <= cap):
        return Plan(0, device, 1, cap, whole)
    storage = storage_bytes(ngf, h, w, eb)
    on_device = device.type == "cpu" or storage <= cap // 2
    storage_dev = device if on_device else torch.device("cpu")
    budget = cap - (storage if on_device else 0)  # on CPU the maps share the same memory
    if tile is None:
        t = next((c for c in TILE_CANDIDATES if tile_bytes(ngf, c, eb) <= budget), TILE_CANDIDATES[-1])
        t = min(t, round_up(max(h, w), 4))
    else:
        t = round_up(int(tile), 4)
    batch = 1
    if device.type == "cuda":
        # Small tiles underuse a GPU: batch same-shaped tiles within the budget.
        batch = int(max(1, min(16, budget // max(1, tile_bytes(ngf, t, eb)))))
    return Plan(t, storage_dev, batch, cap, storage + tile_bytes(ngf, t, eb) * batch)


def default_cap(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * MEMORY_FRACTION)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * MEMORY_FRACTION)
    except OSError:
        pass
    return 8 << 30


def whole_bytes(ngf: int, h: int, w: int, eb: int) -> int:
    # Peak of a plain forward: a few ngf-channel full-resolution maps (conv out, norm out,
    # padded copy) in fp32/bf16 plus the convolution's own workspace.
    return int(4 * ngf * h * w * max(eb, 4) + 64 * h * w)


def storage_bytes(ngf: int, h: int, w: int, eb: int) -> int:
    # Live full-image maps in the executor: at most ~1.5 ngf channels at full resolution
    # (stem output + first downsampling output), plus the fp32 input/output/blend maps.
    return int(1.5 * ngf * h * w * eb + 16 * h * w)


def tile_bytes(ngf: int, t: int, eb: int) -> int:
    # Worst layer per tile: the full-resolution 7x7 convolutions (ngf channels, halo 3) with
    # fp32 read/normalise/pad copies of the input and the output plus its fp32 statistics copy.
    side = t + 6
    return int(ngf * side * side * (3 * 4 + eb) + ngf * t * t * (eb + 4) + 49 * ngf * t * t * eb // 4)

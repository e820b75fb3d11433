"""Tile geometry shared by the tiled executor, the naive sliding window and the seam metric.

All sizes are in pixels of one layer's map.  Plain functions of integers (and one tensor of
blend weights), so the layout the engine uses is the layout the metrics look at.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["MIN_SIDE", "Window", "round_up", "grid", "overlapping_starts", "overlapping_regions", "ramp_weights"]

MIN_SIDE = 16  # smaller images are padded to this so every reflection pad is valid


@dataclass(frozen=True)
class Window:
    """The input rows ``top:bottom`` and columns ``left:right`` one output tile reads.

    May reach outside the map (negative, or past its edge): the reader pads those parts.
    """

    top: int
    bottom: int
    left: int
    right: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.bottom - self.top, self.right - self.left


def round_up(v: int, m: int) -> int:
    return -(-int(v) // m) * m


def grid(n: int, t: int) -> list[tuple[int, int]]:
    """Split 0..n into balanced, non-overlapping pieces of at most ``t``."""
    k = max(1, math.ceil(n / t))
    edges = [round(i * n / k) for i in range(k + 1)]
    return [(edges[i], edges[i + 1]) for i in range(k)]


def overlapping_starts(n: int, t: int, overlap: float) -> list[int]:
    """Starts of tiles of length min(t, n) covering 0..n with at least ``overlap`` * t overlap."""
    if t >= n:
        return [0]
    ov = int(round(t * overlap))
    k = max(2, math.ceil((n - ov) / max(1, t - ov)))
    return sorted(set(int(round(i * (n - t) / (k - 1))) for i in range(k)))


def overlapping_regions(n: int, t: int, overlap: float) -> list[tuple[int, int]]:
    t = min(t, n)
    return [(s, s + t) for s in overlapping_starts(n, t, overlap)]


def ramp_weights(starts: list[int], i: int, length: int, dev: torch.device) -> torch.Tensor:
    """Raised-cosine weights of tile ``i`` along one axis.

    Flat (1) except where the tile overlaps a neighbour: there it ramps with sin^2 / cos^2 over
    exactly the overlap, so the two neighbours' weights sum to 1.  Image borders stay at 1.
    """
    wgt = torch.ones(length, dtype=torch.float32, device=dev)
    s = starts[i]
    if i > 0:
        ov = starts[i - 1] + length - s
        if ov > 0:
            u = (torch.arange(ov, dtype=torch.float32, device=dev) + 0.5) / ov
            wgt[:ov] = torch.sin(u * math.pi / 2) ** 2
    if i + 1 < len(starts):
        ov = s + length - starts[i + 1]
        if ov > 0:
            u = (torch.arange(ov, dtype=torch.float32, device=dev) + 0.5) / ov
            wgt[length - ov:] = torch.minimum(wgt[length - ov:], torch.cos(u * math.pi / 2) ** 2)
    return wgt

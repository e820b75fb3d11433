"""Arithmetic cost of a generator pass, for the benchmarks' FLOP rates (bench/engine.py).

Importable as ``flops`` from a bench script (bench/ is on sys.path) and as ``bench.flops``
from the repository root (tests).
"""
from __future__ import annotations

from torch import nn

from dicom_node.engine.generator import ResnetBlock

__all__ = ["conv_flops"]


def conv_flops(gen: nn.Module, h: int, w: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of one generator pass on an h x w image (for benchmarks)."""
    total = 0.0
    size = {"h": -(-h // 4) * 4, "w": -(-w // 4) * 4}  # the engine pads to multiples of 4

    def visit(mods: list[nn.Module]) -> None:
        reflect = 0
        for m in mods:
            if isinstance(m, nn.ReflectionPad2d):
                reflect = int(m.padding[0])
            elif isinstance(m, nn.Conv2d):
                nonlocal total
                (kh, kw), (sh, sw), (ph, pw) = m.kernel_size, m.stride, m.padding
                ho = (size["h"] + 2 * (reflect + ph) - kh) // sh + 1
                wo = (size["w"] + 2 * (reflect + pw) - kw) // sw + 1
                total += 2.0 * m.in_channels * m.out_channels * kh * kw * ho * wo
                size["h"], size["w"] = ho, wo
                reflect = 0
            elif isinstance(m, nn.ConvTranspose2d):
                (kh, kw), (sh, sw) = m.kernel_size, m.stride
                total += 2.0 * m.in_channels * m.out_channels * kh * kw * size["h"] * size["w"]
                size["h"] = (size["h"] - 1) * sh - 2 * m.padding[0] + kh + m.output_padding[0]
                size["w"] = (size["w"] - 1) * sw - 2 * m.padding[1] + kw + m.output_padding[1]
            elif isinstance(m, ResnetBlock):
                visit(list(m.block))

    visit(list(gen.model))
    return total

"""The CycleGAN ResNet generator, in the one place both the engine and the trainer use.

This follows the classic CycleGAN reference network (Zhu et al., 2017): reflection
padding, a 7x7 stem, two stride-2 downsamplings, ``n_blocks`` residual blocks, two
transposed-convolution upsamplings and a tanh output, with InstanceNorm (no affine
parameters) after every convolution but the last.  One channel in and out, because
radiographs are grayscale.

Two additions:

* ``residual=True``: the network predicts a change that is added to its input
  (``clamp(x + tanh(z), -1, 1)``).  With the last convolution zero-initialised such a
  network starts as the identity, which matters for style translation where the anatomy
  must stay put.
* ``tone_filter=True``: a :class:`~.tone_filter.ToneFilter` (tone curve, band gains, tone
  curve, fitted from the two domains' distributions) runs first; the network then sees, and
  with ``residual`` adds its change to, the tone-filtered image.  It only learns what the
  global stage cannot express.

The layer list is kept flat and explicit on purpose: the seamless tiled executor in
``tiling.py`` walks exactly these modules.
"""
from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import nn

from .tone_filter import ToneFilter

__all__ = ["ResnetBlock", "ResnetGenerator", "init_weights"]

_Net = TypeVar("_Net", bound=nn.Module)


class ResnetBlock(nn.Module):
    """Two 3x3 convolutions with reflection padding and a skip connection."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, kernel_size=3, bias=True),
            nn.InstanceNorm2d(dim),
            nn.ReLU(True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, kernel_size=3, bias=True),
            nn.InstanceNorm2d(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.block(x)
        return x + out


class ResnetGenerator(nn.Module):
    """Maps ``(N, 1, H, W)`` images in [-1, 1] to the same shape (H, W multiples of 4)."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        ngf: int = 64,
        n_blocks: int = 9,
        residual: bool = False,
        tone_filter: bool | dict[str, Any] = False,
    ) -> None:
        super().__init__()
        self.ngf = ngf
        self.n_blocks = n_blocks
        self.residual = residual
        # A dict gives ToneFilter's arguments (as stored in a model file's architecture).
        self.tone_filter: ToneFilter | None = None
        if tone_filter:
            self.tone_filter = ToneFilter(**(tone_filter if isinstance(tone_filter, dict) else {}))
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, ngf, kernel_size=7, bias=True),
            nn.InstanceNorm2d(ngf),
            nn.ReLU(True),
        ]
        for i in range(2):  # downsampling
            mult = 2**i
            layers += [
                nn.Conv2d(ngf * mult, ngf * mult * 2, kernel_size=3, stride=2, padding=1, bias=True),
                nn.InstanceNorm2d(ngf * mult * 2),
                nn.ReLU(True),
            ]
        for _ in range(n_blocks):
            layers.append(ResnetBlock(ngf * 4))
        for i in range(2):  # upsampling
            mult = 2 ** (2 - i)
            layers += [
                nn.ConvTranspose2d(
                    ngf * mult, ngf * mult // 2, kernel_size=3, stride=2, padding=1, output_padding=1, bias=True
                ),
                nn.InstanceNorm2d(ngf * mult // 2),
                nn.ReLU(True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, kernel_size=7, bias=True), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tone_filter is not None:
            x = self.tone_filter(x)
        y: torch.Tensor = self.model(x)
        if self.residual:
            y = torch.clamp(x + y, -1.0, 1.0)
        return y

    def architecture(self) -> dict[str, Any]:
        """The constructor arguments, as stored in a style model's metadata."""
        arch = {"type": "resnet_generator", "ngf": self.ngf, "n_blocks": self.n_blocks, "residual": self.residual}
        if self.tone_filter is not None:  # absent in files written before it existed: they load as before
            arch["tone_filter"] = self.tone_filter.architecture()
        return arch


def init_weights(net: _Net, gain: float = 0.02, zero_last: bool = False) -> _Net:
    """The standard CycleGAN init: conv weights ~ N(0, gain), biases 0.

    ``zero_last`` zeroes the final convolution so a residual generator starts as the identity.
    """
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    for m in convs:
        nn.init.normal_(m.weight, 0.0, gain)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    if zero_last and convs:
        nn.init.zeros_(convs[-1].weight)
    return net

"""The 70x70 PatchGAN discriminator; the generator is the engine's (``dicom_node.engine.generator``).

Classic CycleGAN layout (Isola et al. 2017, Zhu et al. 2017): three stride-2 4x4 convolutions,
one stride-1, and a 1-channel stride-1 output; each output value sees a 70x70 input patch.
InstanceNorm (no affine parameters, so convolutions keep their bias) after every convolution
but the first and the last, LeakyReLU(0.2).
"""
from __future__ import annotations

import copy
from typing import Any, TypeVar

import torch
from torch import nn

from dicom_node.engine.generator import ResnetGenerator, init_weights
from dicom_node.engine.tone_filter import DEFAULT_BAND_KNOTS

__all__ = ["PatchDiscriminator", "build_generator", "build_discriminator", "has_first_stage", "tone_filter_arguments",
           "zero_network"]

_Net = TypeVar("_Net", bound=nn.Module)


class PatchDiscriminator(nn.Module):
    """Maps ``(N, 1, H, W)`` to a map of real/fake scores, one per 70x70 receptive field."""

    def __init__(self, in_channels: int = 1, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1),
                nn.InstanceNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(x)
        return out


def tone_filter_arguments(tone_filter: bool, band_curves: bool, brightness_bins: int = 1,
                          local_tone_bins: int = 1) -> bool | dict[str, Any]:
    """The generator's ``tone_filter`` argument for the config's ``model.tone_filter``,
    ``model.band_curves``, ``model.brightness_bins`` and ``model.local_tone_bins``: off, one gain
    per band (``True``), or band curves (per brightness bin), each with local tone curves or not."""
    if not tone_filter:
        return False
    local = {"local_bins": local_tone_bins} if local_tone_bins > 1 else {}
    if not band_curves:
        return local or True
    return {"band_knots": DEFAULT_BAND_KNOTS, **({"brightness_bins": brightness_bins} if brightness_bins > 1 else {}),
            **local}


def build_generator(ngf: int, n_blocks: int, residual: bool, tone_filter: bool | dict[str, Any] = False) -> ResnetGenerator:
    """The engine's generator with the standard N(0, 0.02) init (identity start when residual).

    ``tone_filter`` adds the global stage in front, as the identity until it is fitted
    (:func:`dicom_node.train.tone_fit.fit_tone_filter`)."""
    gen = ResnetGenerator(ngf=ngf, n_blocks=n_blocks, residual=residual, tone_filter=tone_filter)
    return init_weights(gen, zero_last=residual)


def build_discriminator(ndf: int) -> PatchDiscriminator:
    """A 70x70 PatchGAN with the standard N(0, 0.02) init."""
    return init_weights(PatchDiscriminator(ndf=ndf))


def _last_conv(gen: torch.nn.Module) -> torch.nn.Conv2d:
    return [m for m in gen.modules() if isinstance(m, torch.nn.Conv2d)][-1]


def has_first_stage(gen: torch.nn.Module) -> bool:
    """A residual generator: without its network's output it is its tone filter (or the identity)."""
    return bool(getattr(gen, "residual", False))


def zero_network(gen: _Net) -> _Net:
    """A copy of residual ``gen`` whose network adds nothing: ``clamp(T(x) + tanh(0))`` = its first stage."""
    if not has_first_stage(gen):
        raise ValueError("only a residual generator has a first stage to fall back to")
    out = copy.deepcopy(gen)
    last = _last_conv(out)
    with torch.no_grad():
        last.weight.zero_()
        if last.bias is not None:
            last.bias.zero_()
    return out

"""CycleGAN losses and the discriminators' image history pool.

LSGAN (least squares) adversarial loss: real -> 1, fake -> 0, computed in float32 even under
autocast, so bf16 rounding does not bias the squared error.
"""
from __future__ import annotations

import random
from typing import Any

import torch

__all__ = ["lsgan_loss", "coarse_change_loss", "ImagePool"]


def lsgan_loss(prediction: torch.Tensor, target_is_real: bool) -> torch.Tensor:
    """Mean squared distance of the discriminator's score map from 1 (real) or 0 (fake)."""
    p = prediction.float()
    return ((p - 1.0) ** 2).mean() if target_is_real else (p**2).mean()


def coarse_change_loss(output: torch.Tensor, first_stage: torch.Tensor, size: int) -> torch.Tensor:
    """Mean absolute change from the first stage's output, averaged over ``size``-px blocks first.

    Why: the discriminator compares whole distributions, so where the two domains show different
    anatomy it pulls the network toward that content difference: a shift of level and of
    large-scale contrast that grows over a run (on the real crops the network fell 4 dB below its
    first stage by step 1500).  Those belong to the first stage's tone curves; the network's
    share is detail, which averages out over a block.  Zero-mean changes within a block cost
    nothing.
    """
    change = output.float() - first_stage.float()
    return torch.nn.functional.avg_pool2d(change, size, ceil_mode=True).abs().mean()


class ImagePool:
    """A history of generated images (Shrivastava et al. 2017) that stabilises the discriminators.

    For each image of a batch: while the pool is not full, store and return it; afterwards,
    with probability 1/2 return a stored image and put the new one in its place, otherwise
    return the new image.  Uses its own seeded RNG so runs are reproducible and resumable.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.images: list[torch.Tensor] = []
        self.rng = random.Random(seed)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        if self.images and self.images[0].shape[1:] != images.shape[1:]:
            self.images = []
        out = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif self.rng.random() < 0.5:
                i = self.rng.randrange(self.size)
                out.append(self.images[i].clone())
                self.images[i] = image.clone()
            else:
                out.append(image)
        return torch.cat(out, 0)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and RNG state, loadable with ``torch.load(weights_only=True)``."""
        state = self.rng.getstate()
        return {
            "images": torch.cat(self.images, 0).cpu() if self.images else torch.empty(0),
            "rng_version": state[0],
            "rng_state": torch.tensor(state[1], dtype=torch.int64),
            "rng_gauss": state[2],
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        imgs = state["images"]
        self.images = [imgs[i : i + 1].to(device) for i in range(imgs.shape[0])] if imgs.numel() else []
        self.rng.setstate((state["rng_version"], tuple(int(v) for v in state["rng_state"].tolist()),
                           state["rng_gauss"]))

"""The CycleGAN training step: two generators, two PatchGAN discriminators, their optimisers.

One :meth:`CycleGAN.step` is the classic update (Zhu et al. 2017): generator step (LSGAN +
cycle x lambda_cycle + identity x lambda_identity x lambda_cycle [+ paired L1] [+ the network's
coarse change x lambda_coarse, :func:`.losses.coarse_change_loss`]), then
discriminator step on real vs. history-pool fakes with the loss halved.

What makes it cheaper than the reference implementation without changing the maths:

* The six generator passes are batched into three calls (``G_ab([A, B])`` gives fake B and
  the B identity; ``G_ba([B, A, fake B])`` gives fake A, the A identity and the A cycle;
  ``G_ab(fake A)`` the B cycle).  InstanceNorm normalises each sample on its own, so batching
  changes nothing numerically, but bigger convolutions use the cores better.
* Each discriminator sees real and pooled fake images in one call.
* Discriminator weights are frozen during the generator step (no wasted weight gradients),
  gradients are released with ``set_to_none``, losses stay on the device (no per-step sync).
* bf16 autocast on GPUs and on CPUs that multiply bf16 natively; channels_last on GPUs only
  (what the trainer picks on a CPU: ``train/cpu_speed.py``, measured in bench/train.py).

Under DDP each network is wrapped in ``DistributedDataParallel``; in the generator step the
discriminators are called unwrapped (frozen, nothing to all-reduce).
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dicom_node.engine.generator import ResnetGenerator

from .losses import ImagePool, coarse_change_loss, lsgan_loss
from .networks import build_discriminator, build_generator

__all__ = ["CycleGAN", "LOSS_NAMES"]

LOSS_NAMES = ("g_total", "gan_ab", "gan_ba", "cycle_a", "cycle_b", "idt_a", "idt_b", "paired", "coarse", "d_a", "d_b")


def _unwrap(net: nn.Module) -> nn.Module:
    return getattr(net, "module", net)


class CycleGAN:
    """Networks, optimisers and pools of one CycleGAN run, with a checkpointable state."""

    def __init__(self, *, ngf: int = 64, n_blocks: int = 9, ndf: int = 64, residual: bool = False,
                 tone_filter: bool | dict[str, Any] = False,
                 lr: float = 2e-4, betas: tuple[float, float] = (0.5, 0.999), lambda_cycle: float = 10.0,
                 lambda_identity: float = 0.5, lambda_paired: float = 0.0, lambda_coarse: float = 0.0,
                 coarse_size: int = 16, pool_size: int = 50,
                 device: torch.device | str = "cpu", amp: bool = False, channels_last: bool = True,
                 seed: int = 0, rank: int = 0) -> None:
        self.device = torch.device(device)
        self.amp = amp
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.lambda_cycle, self.lambda_identity, self.lambda_paired = lambda_cycle, lambda_identity, lambda_paired
        self.lambda_coarse, self.coarse_size = lambda_coarse, coarse_size
        self.base_lr = lr
        torch.manual_seed(seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
        nets = {
            "g_ab": build_generator(ngf, n_blocks, residual, tone_filter),
            "g_ba": build_generator(ngf, n_blocks, residual, tone_filter),
            "d_a": build_discriminator(ndf),  # judges domain A (real A vs. fake A)
            "d_b": build_discriminator(ndf),
        }
        for net in nets.values():
            net.to(self.device, memory_format=self.memory_format)  # type: ignore[call-overload]  # Module.to takes memory_format; torch's stubs omit it
        self.nets: dict[str, nn.Module] = nets
        self.opt_g = torch.optim.Adam(list(nets["g_ab"].parameters()) + list(nets["g_ba"].parameters()),
                                      lr=lr, betas=betas)
        self.opt_d = torch.optim.Adam(list(nets["d_a"].parameters()) + list(nets["d_b"].parameters()),
                                      lr=lr, betas=betas)
        self.pool_a = ImagePool(pool_size, seed=(seed * 1009 + rank) * 2)
        self.pool_b = ImagePool(pool_size, seed=(seed * 1009 + rank) * 2 + 1)

    def set_tone_filters(self, ab: nn.Module, ba: nn.Module) -> None:
        """Load fitted tone filters (:mod:`.tone_fit`) into the two generators (before DDP wrapping)."""
        for name, fitted in (("g_ab", ab), ("g_ba", ba)):
            own = self.generator(name).tone_filter
            if own is None:
                raise ValueError("the generators were built without a tone filter")
            own.load_state_dict(fitted.state_dict())
            own.to(self.device)

    # ------------------------------------------------------------------ distributed

    def wrap_ddp(self, device_ids: list[int] | None = None) -> None:
        """Wrap every network in DistributedDataParallel (call after loading a checkpoint)."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.nets = {k: DDP(v, device_ids=device_ids) for k, v in self.nets.items()}

    def module(self, name: str) -> nn.Module:
        """The plain network (without a DDP wrapper)."""
        return _unwrap(self.nets[name])

    def generator(self, name: str) -> ResnetGenerator:
        """The plain generator ``g_ab`` or ``g_ba`` (without a DDP wrapper)."""
        gen = self.module(name)
        if not isinstance(gen, ResnetGenerator):
            raise TypeError(f"{name} is not a generator")
        return gen

    # ------------------------------------------------------------------ training

    def set_lr(self, lr: float) -> None:
        for opt in (self.opt_g, self.opt_d):
            for group in opt.param_groups:
                group["lr"] = lr

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _to_device(self, x: Any) -> torch.Tensor:
        t = torch.as_tensor(x).to(self.device, non_blocking=True)
        return t.contiguous(memory_format=self.memory_format)

    def step(self, real_a: Any, real_b: Any, paired: bool = False) -> dict[str, torch.Tensor]:
        """One generator step and one discriminator step; returns detached loss tensors."""
        real_a, real_b = self._to_device(real_a), self._to_device(real_b)
        n = real_a.shape[0]
        g_ab, g_ba, d_a, d_b = (self.nets[k] for k in ("g_ab", "g_ba", "d_a", "d_b"))
        lam_c = self.lambda_cycle
        lam_i = self.lambda_identity * lam_c
        use_idt = lam_i > 0

        # ---- generator step (discriminators frozen, called without their DDP wrapper)
        for d in (d_a, d_b):
            _unwrap(d).requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        with self._autocast():
            out_ab = g_ab(torch.cat([real_a, real_b]) if use_idt else real_a)
            fake_b = out_ab[:n]
            out_ba = g_ba(torch.cat([real_b, real_a, fake_b]) if use_idt else torch.cat([real_b, fake_b]))
            fake_a = out_ba[:n]
            rec_a = out_ba[-n:]
            rec_b = g_ab(fake_a)
            gan_ab = lsgan_loss(_unwrap(d_b)(fake_b), True)
            gan_ba = lsgan_loss(_unwrap(d_a)(fake_a), True)
        cycle_a = F.l1_loss(rec_a.float(), real_a) * lam_c
        cycle_b = F.l1_loss(rec_b.float(), real_b) * lam_c
        zero = torch.zeros((), device=self.device)
        if use_idt:  # G_ab(B) should stay B, G_ba(A) should stay A
            idt_b = F.l1_loss(out_ab[n:].float(), real_b) * lam_i
            idt_a = F.l1_loss(out_ba[n:2 * n].float(), real_a) * lam_i
        else:
            idt_a = idt_b = zero
        if paired and self.lambda_paired > 0:
            paired_l1 = (F.l1_loss(fake_b.float(), real_b) + F.l1_loss(fake_a.float(), real_a)) * self.lambda_paired
        else:
            paired_l1 = zero
        coarse = self._coarse_change(real_a, fake_b, "g_ab") + self._coarse_change(real_b, fake_a, "g_ba")
        loss_g = gan_ab + gan_ba + cycle_a + cycle_b + idt_a + idt_b + paired_l1 + coarse
        loss_g.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
        self.opt_g.step()

        # ---- discriminator step (real and pooled fake in one call each, loss halved)
        for d in (d_a, d_b):
            _unwrap(d).requires_grad_(True)
        self.opt_d.zero_grad(set_to_none=True)
        pooled_b = self.pool_b.query(fake_b.detach().float()).to(real_b.dtype)
        pooled_a = self.pool_a.query(fake_a.detach().float()).to(real_a.dtype)
        with self._autocast():
            score_b = d_b(torch.cat([real_b, pooled_b.contiguous(memory_format=self.memory_format)]))
            score_a = d_a(torch.cat([real_a, pooled_a.contiguous(memory_format=self.memory_format)]))
        loss_d_b = 0.5 * (lsgan_loss(score_b[:n], True) + lsgan_loss(score_b[n:], False))
        loss_d_a = 0.5 * (lsgan_loss(score_a[:n], True) + lsgan_loss(score_a[n:], False))
        (loss_d_a + loss_d_b).backward()  # type: ignore[no-untyped-call]  # as above
        self.opt_d.step()
        values = (loss_g, gan_ab, gan_ba, cycle_a, cycle_b, idt_a, idt_b, paired_l1, coarse, loss_d_a, loss_d_b)
        return {k: v.detach() for k, v in zip(LOSS_NAMES, values)}

    def _coarse_change(self, real: torch.Tensor, fake: torch.Tensor, name: str) -> torch.Tensor:
        """``lambda_coarse`` x the network's change over its first stage, in ``coarse_size`` blocks."""
        tone = self.generator(name).tone_filter
        if self.lambda_coarse <= 0 or tone is None:
            return torch.zeros((), device=self.device)
        with torch.no_grad():
            first = tone(real.float())
        return coarse_change_loss(fake, first, self.coarse_size) * self.lambda_coarse

    @torch.no_grad()
    def translate_both(self, a: Any, b: Any) -> dict[str, torch.Tensor]:
        """A, G(A), F(G(A)), B, F(B), G(F(B)) for sample panels (eval, no grad)."""
        a, b = self._to_device(a), self._to_device(b)
        g_ab, g_ba = self.module("g_ab"), self.module("g_ba")
        with self._autocast():
            fb = g_ab(a)
            fa = g_ba(b)
            out = {"a": a, "g_a": fb, "f_g_a": g_ba(fb), "b": b, "f_b": fa, "g_f_b": g_ab(fa)}
        return {k: v.float().cpu() for k, v in out.items()}

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything to resume, as tensors and plain values (``torch.load(weights_only=True)``)."""
        def cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.detach().cpu().contiguous() for k, v in sd.items()}

        return {
            **{name: cpu(self.module(name).state_dict()) for name in self.nets},
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "pool_a": self.pool_a.state_dict(),
            "pool_b": self.pool_b.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.nets:
            self.module(name).load_state_dict(state[name])
            self.module(name).to(self.device, memory_format=self.memory_format)  # type: ignore[call-overload]  # as above
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.pool_a.load_state_dict(state["pool_a"], self.device)
        self.pool_b.load_state_dict(state["pool_b"], self.device)

"""Multi-process training with ``torchrun``: which rank am I, and the process group around it.

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them the
trainer runs as a single process.  NCCL is used for CUDA devices, gloo otherwise (so the DDP
path runs, and is tested, with CPU processes too).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["DistInfo", "init_distributed", "barrier", "shutdown", "pick_device"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    """``auto``: this rank's GPU when there is one, else the CPU; ``cuda`` means this rank's GPU."""
    if pref in ("auto", "cuda", "gpu"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if pref != "auto":
            from dicom_node.engine.errors import UserError

            raise UserError(f"device {pref!r} requested but no CUDA GPU is available")
        return torch.device("cpu")
    return torch.device(pref)


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

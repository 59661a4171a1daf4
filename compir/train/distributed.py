"""Scale-out with ``torchrun``: process-group setup and the few collectives the loop needs.

``torchrun --nproc_per_node N -m compir train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; the
loop then wraps the model in DistributedDataParallel (NCCL on CUDA, gloo on the CPU). Without
those variables everything here is a no-op for one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> the first CUDA device if there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def setup_distributed(device: str = "auto") -> DistContext:
    """Join the torchrun process group if there is one and choose this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = resolve_device(device)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", local_rank if world_size > 1 else (chosen.index or 0))
        torch.cuda.set_device(chosen)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen)


def cleanup_distributed(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_value(value: float, ctx: DistContext) -> float:
    """Rank 0's ``value`` on every process (e.g. elapsed time, so all stop at the same step)."""
    if not ctx.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.broadcast(tensor, src=0)
    return float(tensor.item())

"""Where this process stands among the ranks of a DDP run (torch.distributed)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """Average of a tensor over every rank (the tensor itself on one process)."""
    _, size = world()
    if size == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / size


def rank0_decides(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank: a decision all ranks must take alike."""
    if world()[1] == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def local_device(device: torch.device) -> torch.device:
    """The device of this rank: CUDA devices are taken one per rank, by ``LOCAL_RANK``."""
    if device.type == "cuda" and world()[1] > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device

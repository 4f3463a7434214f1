"""Gathering across ranks for the losses. Single-process runs pass through untouched."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when no process group is initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0; gradients flow back to each rank's slice
    (summed over the ranks that used it, so DDP-style gradient averaging recovers the
    gradient of the global mean loss)."""
    if world()[1] == 1:
        return x
    return torch.cat(dist_fn.all_gather(x.contiguous()), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if world()[1] == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world()[1])]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def max_over_ranks(value: int) -> int:
    if world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())

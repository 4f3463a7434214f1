"""Gathering across ranks for the losses. Single-process runs pass through untouched."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F

from vlp.ranks import world


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


def gather_padded(tokens: torch.Tensor, mask: torch.Tensor, with_grad: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token tensors `[b, L, ...]` and their masks `[b, L]` from every rank. Ranks may trim
    captions to different lengths; all-gathers need equal shapes, so each pads to the
    longest (the pads are masked). Returns (local tokens, local mask, all tokens, all mask),
    the local ones padded like the gathered ones."""
    if world()[1] == 1:
        return tokens, mask, tokens, mask
    length = max_over_ranks(tokens.shape[1])
    pad = length - tokens.shape[1]
    tokens = F.pad(tokens, (0, 0) * (tokens.dim() - 2) + (0, pad))
    mask = F.pad(mask, (0, pad))
    gathered = gather_with_grad(tokens) if with_grad else gather_no_grad(tokens)
    return tokens, mask, gathered, gather_no_grad(mask)


def gather_rows(x: torch.Tensor, with_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `[n, ...]` from every rank when ranks may hold different numbers of them (hard
    negatives: not every caption yields one). Each rank pads to the largest n; returns
    (all rows, valid [total] bool) with the pads marked invalid."""
    if world()[1] == 1:
        return x, torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    count = max_over_ranks(x.shape[0])
    valid = torch.arange(count, device=x.device) < x.shape[0]
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, count - x.shape[0]))
    gathered = gather_with_grad(padded) if with_grad else gather_no_grad(padded)
    return gathered, gather_no_grad(valid)

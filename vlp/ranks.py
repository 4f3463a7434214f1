"""Which process this is: (rank, world_size) of torch.distributed, (0, 1) without one.
Shared by the data room (which shards a rank reads) and the losses (what to gather)."""
from __future__ import annotations

import torch.distributed as dist


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1

"""Process-group setup for every way of starting a run: the deepspeed launcher (also with
--num_accelerators on CPU and a hostfile across nodes), torchrun, or plain `python`."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: str  # "cpu" or e.g. "cuda:0"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def on_gpu(self) -> bool:
        return not self.device.startswith("cpu")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(threads: int = 0) -> World:
    """Join (or, for a plain `python` run, create) the process group.

    Launchers export RANK/WORLD_SIZE/MASTER_*; a plain process gets a one-rank world here,
    because otherwise DeepSpeed goes looking for MPI and fails. On CPU each rank gets
    `threads` intra-op threads (0: the usable cores split evenly between local ranks)."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    deepspeed.init_distributed(auto_mpi_discovery=False)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ["WORLD_SIZE"])
    # torchrun names it LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE.
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        device = "cpu"
        cores = len(os.sched_getaffinity(0))
        if cores >= (os.cpu_count() or cores):  # not pinned by the launcher: share the cores
            cores //= max(1, local_world)
        torch.set_num_threads(threads or max(1, cores))
    else:
        device = f"{accelerator.device_name()}:{local_rank}"
        accelerator.set_device(local_rank)
    return World(rank, local_rank, world_size, local_world, device)

"""Run a function on N gloo ranks in spawned processes and collect what each rank returns."""
from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


def _on_rank(rank: int, fn, tmp: str, world: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    gathered = [None] * world
    dist.all_gather_object(gathered, fn(rank))
    if rank == 0:
        Path(tmp, "result.json").write_text(json.dumps(gathered))
    dist.destroy_process_group()


def run_ranks(fn, tmp_path: Path, world: int = 2) -> list:
    """`fn(rank)` runs inside an initialized process group and returns a JSON-able result;
    the list of results, by rank, comes back. spawn, not fork: a child forked after the
    parent ran torch ops can hang on the inherited OpenMP state."""
    mp.start_processes(_on_rank, args=(fn, str(tmp_path), world), nprocs=world, join=True,
                       start_method="spawn")
    return json.loads((Path(tmp_path) / "result.json").read_text())

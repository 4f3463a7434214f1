"""Training checkpoints: DeepSpeed engine state + our trainer state + per-rank RNG.

Layout: CKPT_DIR/step-00000200/ (DeepSpeed files, trainer.json, config.yaml,
rng-rank{R}.pt) and CKPT_DIR/latest naming the newest. Every rank writes into
tmp-step-…/ first; once all have finished it is renamed into place, so a crash mid-save
never leaves a half checkpoint that `resume=auto` would pick."""
from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vlp.atomic import atomic_write_text

from vlp.train.launch import World

PREFIX = "step-"
TMP_PREFIX = "tmp-"
TRAINER_FILE = "trainer.json"
CONFIG_FILE = "config.yaml"


def tag_for(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, ckpt_dir: Path, step: int, trainer: dict[str, Any], config_yaml: str,
         world: World, keep: int) -> Path:
    """Collective: every rank must call it at the same step."""
    tag = tag_for(step)
    tmp = ckpt_dir / (TMP_PREFIX + tag)
    if world.local_rank == 0 and tmp.exists():  # left by a crash during an earlier save
        shutil.rmtree(tmp)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, save_latest=False)
    torch.save(rng_state(), tmp / f"rng-rank{world.rank}.pt")
    if world.local_rank == 0:
        (tmp / TRAINER_FILE).write_text(json.dumps(trainer, indent=1))
        (tmp / CONFIG_FILE).write_text(config_yaml)
    # Nodes finalize one after another: on shared storage the first renames and the rest
    # find nothing left to do; on node-local storage each renames its own copy.
    nodes = max(1, world.world_size // max(1, world.local_world_size))
    for node in range(nodes):
        dist.barrier()
        if world.local_rank == 0 and world.rank // max(1, world.local_world_size) == node:
            _finalize(ckpt_dir, tmp, tag, keep)
    dist.barrier()
    return ckpt_dir / tag


def _finalize(ckpt_dir: Path, tmp: Path, tag: str, keep: int) -> None:
    if not tmp.is_dir():
        return
    final = ckpt_dir / tag
    if final.exists():  # saved twice at one step (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(ckpt_dir / "latest", tag)
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir()
                  if p.is_dir() and p.name.startswith(PREFIX) and (p / TRAINER_FILE).is_file())


def find_checkpoint(spec: str, ckpt_dir: Path) -> Path | None:
    """`auto`: the newest finished checkpoint in `ckpt_dir`, or None on a fresh run.
    Otherwise a checkpoint directory, or a checkpoints directory (its newest)."""
    if spec == "auto":
        found = list_checkpoints(ckpt_dir)
        return found[-1] if found else None
    path = Path(spec)
    if (path / TRAINER_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    raise FileNotFoundError(f"train.resume: no checkpoint at {path} (expected a directory with "
                            f"{TRAINER_FILE}, or a checkpoints directory holding {PREFIX}* ones)")


def read_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / TRAINER_FILE).read_text())


def load(engine, path: Path, world: World) -> dict[str, Any]:
    """Restore engine (weights, optimizer, schedule) and this rank's RNG; return the trainer
    state (step, data epoch, ...)."""
    loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name,
                                       load_optimizer_states=True, load_lr_scheduler_states=True)
    if loaded is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint at {path}")
    rng_file = path / f"rng-rank{world.rank}.pt"
    if not rng_file.is_file():
        warnings.warn(f"{rng_file} missing (different world size?); using rank 0's RNG state")
        rng_file = path / "rng-rank0.pt"
    set_rng_state(torch.load(rng_file, weights_only=False))
    return read_trainer_state(path)

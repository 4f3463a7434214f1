"""Training checkpoints: DeepSpeed engine state + our trainer state + per-rank RNG.

Layout: CKPT_DIR/step-00000200/ (DeepSpeed files, trainer.json, config.yaml,
rng-rank{R}.pt, checksums.json) and CKPT_DIR/latest naming the newest. Every rank writes
into tmp-step-…/ first; once all have finished it is renamed into place, so a crash mid-save
never leaves a half checkpoint that `resume=auto` would pick.

checksums.json (size + sha256 of every other file) is written with the checkpoint. Resuming
verifies it: `auto` falls back to the newest checkpoint that is intact, saying which it
skipped and why; a named checkpoint that is damaged is an error naming the file. Loaded
weights that are not finite are an error too (resuming or exporting them would spread
NaNs silently)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from vlp.atomic import atomic_write_json, atomic_write_text

from vlp.train.launch import World

PREFIX = "step-"
TMP_PREFIX = "tmp-"
TRAINER_FILE = "trainer.json"
CONFIG_FILE = "config.yaml"
CHECKSUMS_FILE = "checksums.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: damaged files, non-finite weights; names it."""


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
    write_checksums(tmp)
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


def find_checkpoint(spec: str, ckpt_dir: Path, world: Optional[World] = None) -> Path | None:
    """The checkpoint to resume from, verified against its checksums.

    `auto`: the newest intact checkpoint in `ckpt_dir` (newer damaged ones are skipped, and
    rank 0 says so), or None on a fresh run. Otherwise a checkpoint directory, which must be
    intact, or a checkpoints directory (its newest intact one). CheckpointError when none is.
    Collective when `world` has several ranks: they share the hashing and agree."""
    if spec == "auto":
        candidates, explicit = list_checkpoints(ckpt_dir)[::-1], False
        if not candidates:
            return None
    else:
        path = Path(spec)
        explicit = (path / TRAINER_FILE).is_file()
        candidates = [path] if explicit else list_checkpoints(path)[::-1]
        if not candidates:
            raise FileNotFoundError(f"train.resume: no checkpoint at {path} (expected a directory with "
                                    f"{TRAINER_FILE}, or a checkpoints directory holding {PREFIX}* ones)")
    damaged = []
    for candidate in candidates:
        problems = _agreed(verify_checksums(candidate, _share(world)), world)
        if not problems:
            if damaged and (world is None or world.is_main):
                print(f"resume: falling back to {candidate}; skipped damaged newer checkpoint(s): "
                      + "; ".join(f"{p.name}: {why[0]}" for p, why in damaged), flush=True)
            return candidate
        damaged.append((candidate, problems))
        if explicit:
            break
    detail = "; ".join(f"{p}: {', '.join(why[:3])}" for p, why in damaged)
    raise CheckpointError(f"no intact checkpoint to resume from ({detail}); resume from an older one "
                          f"with train.resume=PATH, or start a new run")


def write_checksums(ckpt: Path) -> None:
    """Size and sha256 of every file of a complete checkpoint (before it is renamed into place)."""
    sums = {str(f.relative_to(ckpt)): {"size": f.stat().st_size, "sha256": _sha256(f)}
            for f in _files(ckpt)}
    atomic_write_json(ckpt / CHECKSUMS_FILE, sums, indent=1)


def verify_checksums(ckpt: Path, share: tuple[int, int] = (0, 1)) -> list[str]:
    """What is wrong with a checkpoint's files ([] when intact), checking this process's
    `share` = (index, count) of them. A checkpoint written before checksums existed cannot
    be verified: a warning, and it counts as intact."""
    path = ckpt / CHECKSUMS_FILE
    if not path.is_file():
        warnings.warn(f"{ckpt} has no {CHECKSUMS_FILE} (written by an older vlp): not verified")
        return []
    try:
        sums = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        return [f"{CHECKSUMS_FILE} is unreadable ({err})"]
    index, count = share
    problems = []
    for name in sorted(sums)[index::count]:
        file, want = ckpt / name, sums[name]
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != want["size"]:
            problems.append(f"{name} has {file.stat().st_size} bytes, not {want['size']} (cut short?)")
        elif _sha256(file) != want["sha256"]:
            problems.append(f"{name} does not match its checksum (corrupted)")
    return problems


def _files(ckpt: Path) -> list[Path]:
    return sorted(f for f in ckpt.rglob("*") if f.is_file() and f.name != CHECKSUMS_FILE)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _share(world: Optional[World]) -> tuple[int, int]:
    """Each node checks its own copy (node-local storage holds one per node), its local ranks
    splitting the files between them."""
    return (0, 1) if world is None else (world.local_rank, max(1, world.local_world_size))


def _agreed(problems: list[str], world: Optional[World]) -> list[str]:
    """Every rank's findings, on every rank: all resume from the same checkpoint."""
    if world is None or world.world_size == 1:
        return problems
    gathered: list = [None] * world.world_size
    dist.all_gather_object(gathered, problems)
    return sorted({p for part in gathered for p in part})


def read_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((path / TRAINER_FILE).read_text())


def load(engine, path: Path, world: World) -> dict[str, Any]:
    """Restore engine (weights, optimizer, schedule) and this rank's RNG; return the trainer
    state (step, data epoch, ...). CheckpointError, naming `path`, when it cannot be loaded
    or its weights are not finite."""
    try:
        loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name,
                                           load_optimizer_states=True, load_lr_scheduler_states=True)
    except Exception as err:  # torch/DeepSpeed raise many types for damaged files
        raise CheckpointError(f"cannot load the checkpoint {path}: {type(err).__name__}: {err}") from err
    if loaded is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint at {path}")
    bad = _agreed(nonfinite_parameters(engine.module), world)
    if bad:
        raise CheckpointError(f"the checkpoint {path} holds non-finite weights ({', '.join(bad[:5])}"
                              f"{' and more' if len(bad) > 5 else ''}): the run diverged before it was "
                              f"saved; resume from an earlier checkpoint with train.resume=PATH")
    rng_file = path / f"rng-rank{world.rank}.pt"
    if not rng_file.is_file():
        warnings.warn(f"{rng_file} missing (different world size?); using rank 0's RNG state")
        rng_file = path / "rng-rank0.pt"
    set_rng_state(torch.load(rng_file, weights_only=False))
    return read_trainer_state(path)


def nonfinite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of parameters with an inf or NaN (this rank's partition under ZeRO-3)."""
    return [name for name, param in module.named_parameters()
            if not torch.isfinite(getattr(param, "ds_tensor", param).detach()).all()]

"""A run's output directory holds one run: a new run never writes into an earlier one's.

Without this, a second run into the same directory pruned its own new checkpoints against
the old run's (keep-last-K counts both), overwrote some of them, left the old model/
exported, and a later --resume picked the old run's newest checkpoint."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from vlp.config import ConfigError

# What a training run writes into its directory (see vlp.train.loop).
RUN_FILES = ("checkpoints", "metrics.jsonl", "eval.json", "model", "tensorboard", "config.yaml",
             "ds_config.json", "metrics.png")
# Those whose presence means a run happened there (config files alone are written at start).
TRACES = ("checkpoints", "metrics.jsonl", "eval.json", "model")


def earlier_run(run_dir: Path) -> list[str]:
    """The traces of an earlier run in `run_dir`, or [] when it holds none."""
    found = []
    for name in TRACES:
        path = run_dir / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name + ("/" if path.is_dir() else ""))
    return found


def prepare_run_dir(run_dir: Path, resume: Optional[str], overwrite: bool) -> None:
    """Refuse a new run into a directory holding an earlier run, unless it resumes that run
    (`train.resume`) or replaces it (`train.overwrite=true`: the earlier run's files are
    deleted first, by local rank 0 of each node). Every rank calls it before the process
    group exists, so nothing is written before the rendezvous that follows."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise ConfigError("train.overwrite=true deletes the run that train.resume / --resume would "
                          "continue: give one of them")
    found = earlier_run(run_dir)
    if not found or resume:
        return
    if not overwrite:
        raise ConfigError(f"output_dir {run_dir} already holds a run ({', '.join(found)}): continue it "
                          f"with --resume, choose a new output_dir, or replace it with train.overwrite=true")
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"train.overwrite=true: deleting the earlier run in {run_dir} ({', '.join(found)})", flush=True)
        for name in RUN_FILES:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

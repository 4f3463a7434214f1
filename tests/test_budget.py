"""train.max_minutes: the budget's progress, stop decision and LR schedule (fake clock), and
a real run that stops on its budget, resumes it, and agrees across 2 ranks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlp.train.budget import Budget, schedule_factor
from vlp.train.engine import build_optimizer
from vlp.config import TrainConfig

from tests.test_train import BIN, PRETRAIN, free_port, run, shards, write_config  # noqa: F401  (shards: fixture)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_follows_time_under_a_budget_and_steps_without():
    clock = FakeClock()
    budget = Budget(minutes=2, total_steps=1000, clock=clock)
    budget.start()
    clock.now += 30
    budget.elapsed = budget.local_elapsed()
    assert budget.progress(step=10) == pytest.approx(0.25)      # time is ahead of steps
    assert budget.progress(step=500) == pytest.approx(0.5)      # steps ahead of time: the cap
    assert not budget.exhausted() and budget.remaining_minutes() == pytest.approx(1.5)
    clock.now += 90
    budget.elapsed = budget.local_elapsed()
    assert budget.exhausted() and budget.progress(10) == 1.0
    plain = Budget(minutes=0, total_steps=200, clock=clock)
    plain.start()
    clock.now += 10**6
    plain.elapsed = plain.local_elapsed()
    assert plain.progress(50) == 0.25 and not plain.exhausted() and plain.remaining_minutes() is None


def test_resumed_budget_continues_from_the_time_already_spent():
    clock = FakeClock()
    budget = Budget(minutes=1, total_steps=10**6, spent=45.0, clock=clock)
    budget.start()
    assert budget.local_elapsed() == 45.0
    clock.now += 15
    budget.elapsed = budget.local_elapsed()
    assert budget.exhausted()


def test_lr_schedule_warms_up_and_decays_inside_the_budget():
    clock = FakeClock()
    train = TrainConfig(steps=10**6, max_minutes=10, lr=1.0, warmup_fraction=0.1, min_lr_ratio=0.0)
    budget = Budget(train.max_minutes, train.steps, clock=clock)
    optimizer, schedule, _ = build_optimizer(torch.nn.Linear(2, 2), train, budget)
    budget.start()
    seen = {}
    for minute in (0.5, 1.0, 5.5, 9.99):
        clock.now = 100 + 60 * minute
        budget.elapsed = budget.local_elapsed()
        optimizer.step()
        schedule.step()
        seen[minute] = optimizer.param_groups[0]["lr"]
    assert seen[0.5] == pytest.approx(0.5, abs=1e-3)           # half way through warmup
    assert seen[1.0] == pytest.approx(1.0, abs=1e-3)           # peak at the end of warmup
    assert seen[5.5] == pytest.approx(0.5, abs=1e-3)           # cosine half way down
    assert seen[9.99] < 1e-3                                   # floor by the budget's end
    assert schedule_factor(0.0, 0.1, 0.0, first_step=1e-6) > 0  # the first step still learns


def train_lines(run_dir: Path) -> list[dict]:
    lines = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in lines if r["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_a_budget_ends_the_run_like_its_last_step_and_resume_continues_it(shards, tmp_path, ranks):
    """A budget far below train.steps' time: the run stops early but saves, evaluates and
    exports; --resume with a larger budget continues from the time already spent."""
    config = write_config(tmp_path / "cfg.yaml", shards["train"], shards["val"], steps=100000,
                          checkpoint_every=0, precision="auto", warmup_fraction=0.2, max_minutes=0.05)
    run_dir = tmp_path / "run"
    launcher = ([sys.executable] if ranks == 1 else
                [str(BIN / "deepspeed"), "--num_accelerators", "2", "--master_port", free_port()])
    done = run([*launcher, PRETRAIN, "--config", str(config), f"output_dir={run_dir}"])
    assert "time budget of 0.05 min reached" in done.stdout and "precision auto:" in done.stdout
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    trainer = json.loads((run_dir / "checkpoints" / latest / "trainer.json").read_text())
    assert 1 <= trainer["step"] < 100000 and trainer["train_seconds"] >= 3.0
    assert (run_dir / "model" / "model.safetensors").is_file() and (run_dir / "eval.json").is_file()
    lines = train_lines(run_dir)
    assert lines[-1]["train_minutes"] >= 0.05 and lines[-1]["lr"] < 0.2 * max(r["lr"] for r in lines)
    done = run([*launcher, PRETRAIN, "--resume", "--config", str(config), f"output_dir={run_dir}",
                "train.max_minutes=0.1"])
    assert f"at step {trainer['step']}" in done.stdout and "min of training spent" in done.stdout
    resumed = train_lines(run_dir)[-1]
    assert resumed["step"] > trainer["step"] and resumed["train_minutes"] >= 0.1

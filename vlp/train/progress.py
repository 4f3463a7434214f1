"""What a run tells its user: a live tqdm bar on rank 0, metrics.jsonl, TensorBoard when
it is installed."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vlp.atomic import atomic_write_text


class Meter:
    """Sums over the steps since the last log line: loss terms, step and data-wait time."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.terms: dict[str, float] = {}
        self.steps = 0
        self.samples = 0
        self.step_time = 0.0
        self.data_time = 0.0
        self.skipped: dict[str, int] = {}

    def add(self, terms: dict[str, float], samples: int, step_time: float, data_time: float,
            skipped: dict[str, int]) -> None:
        for name, value in terms.items():
            self.terms[name] = self.terms.get(name, 0.0) + value
        self.steps += 1
        self.samples += samples
        self.step_time += step_time
        self.data_time += data_time
        for reason, count in skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count

    def means(self) -> dict[str, float]:
        return {name: total / max(1, self.steps) for name, total in self.terms.items()}


class RunLog:
    """Rank 0 owns the bar and the files; other ranks get a RunLog that does nothing."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self.bar = None
        self.writer = None
        if not enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        dropped = drop_lines_after(self.path, start_step)
        if dropped:
            print(f"{self.path}: dropped {dropped} line(s) past step {start_step}, the steps this run "
                  f"replays (one line per step and kind stays)", flush=True)
        self.total_steps = total_steps
        self.mean_step_time: float | None = None
        self.bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step",
                        dynamic_ncols=True, mininterval=1.0, smoothing=0.1)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self.writer = None

    def step(self, losses: dict[str, float], lr: float, world_size: int, step_time: float,
             data_time: float, samples: int, minutes_left: float | None = None) -> None:
        if not self.enabled:
            return
        rate = samples / max(step_time, 1e-9)
        shown = {k: f"{v:.3f}" for k, v in losses.items()}
        shown.update(lr=f"{lr:.2e}", **{"sam/s": f"{rate:.0f}", "sam/s/rank": f"{rate / world_size:.0f}",
                                        "wait": f"{data_time / max(step_time, 1e-9):.0%}"})
        if minutes_left is not None:  # under a time budget the step count is only a cap
            shown["left"] = f"{minutes_left:.1f}min"
            self._project_total(minutes_left, step_time)
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def _project_total(self, minutes_left: float, step_time: float) -> None:
        """Under a budget the bar's total is the steps the time left allows at the recent pace
        (at most train.steps), so its fraction and its ETA are the budget's, not a far cap's."""
        recent = self.mean_step_time
        self.mean_step_time = step_time if recent is None else 0.9 * recent + 0.1 * step_time
        ahead = round(60.0 * minutes_left / max(self.mean_step_time, 1e-9))
        self.bar.total = min(self.total_steps, self.bar.n + 1 + ahead)

    def record(self, step: int, kind: str, values: dict[str, Any]) -> None:
        """One line of metrics.jsonl; numeric values also go to TensorBoard as kind/name."""
        if not self.enabled:
            return
        line = {"step": step, "kind": kind, "time": time.time(), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")
        if self.writer is not None:
            for name, value in _flatten(values).items():
                self.writer.add_scalar(f"{kind}/{name}", value, step)

    def print(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def drop_lines_after(path: Path, step: int) -> int:
    """Remove the metrics lines of steps after `step`, and lines cut short by a crash,
    atomically; returns how many. A resumed run replays the steps after its checkpoint and
    logs them again: without this, readers and plots saw those steps twice."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            keep = record["step"] <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(kept))
    return dropped


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[prefix + name] = float(value)
    return flat

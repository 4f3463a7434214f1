"""The run's clock: a wall-clock training budget (`train.max_minutes`) and the schedule
progress it drives.

Progress is the fraction of the run done: step / train.steps, or, under a budget, the larger
of that and elapsed / budget, so warmup and decay finish inside the budget on a slow machine
and inside train.steps on a fast one. Every rank uses rank 0's clock (`agree`), so all ranks
apply the same learning rate and stop at the same step. Time already spent travels in the
checkpoint (`spent`), so a resumed run continues the budget instead of starting it again.
"""
from __future__ import annotations

import math
import time
from typing import Callable


class Budget:
    def __init__(self, minutes: float, total_steps: int, spent: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        self.seconds = 60.0 * minutes
        self.total_steps = total_steps
        self.clock = clock
        self.spent = spent          # seconds of earlier sessions of this run (from a checkpoint)
        self.elapsed = spent        # rank 0's elapsed seconds as last agreed by every rank
        self._started: float | None = None

    @property
    def enabled(self) -> bool:
        return self.seconds > 0

    def start(self) -> None:
        self._started = self.clock()
        self.elapsed = self.spent

    def local_elapsed(self) -> float:
        """This process's elapsed seconds now (only rank 0's counts)."""
        if self._started is None:
            return self.spent
        return self.spent + self.clock() - self._started

    def progress(self, step: int) -> float:
        """Fraction of the run done before `step`, in [0, 1]."""
        done = step / max(1, self.total_steps)
        if self.enabled:
            done = max(done, self.elapsed / self.seconds)
        return min(1.0, done)

    def exhausted(self) -> bool:
        return self.enabled and self.elapsed >= self.seconds

    def remaining_minutes(self) -> float | None:
        return max(0.0, self.seconds - self.elapsed) / 60 if self.enabled else None


def schedule_factor(progress: float, warmup: float, min_ratio: float, first_step: float) -> float:
    """LR multiplier at `progress` (fraction of the run done before this step): linear warmup
    over the first `warmup` of the run, then cosine down to `min_ratio` at the end.
    `first_step` is the progress one step adds (1 / train.steps), so the first step's LR is
    not 0; without a budget this is exactly the classic per-step warmup + cosine."""
    if progress < warmup:
        return min(1.0, (progress + first_step) / warmup)
    span = max(1e-12, 1.0 - warmup)
    decay = min(1.0, (progress - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * decay))

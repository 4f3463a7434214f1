"""The objective interface.

An objective is one module in `vlp/losses/`: a class with a `name` (its config section
`loss.<name>` and the name of its loss in logs and eval), an options dataclass (`Options`,
with at least `weight`), the shared features it `needs`, and a `forward(features)` that
returns `{"loss": scalar, **metrics}`. The model computes each shared feature at most once
per batch (`vlp.model.features.Features`) and hands the same object to every enabled
objective; the loop sums and logs whatever comes back. Listing the class in
`vlp.losses.OBJECTIVES` is all it takes to configure, weight, log, checkpoint and evaluate
it (see docs/architecture.md, "Adding an objective").

Features an objective may read (`features.<name>`): `image_states`, `text_states`,
`image_emb`, `text_emb` (global, L2-normalized), `image_tokens`, `text_tokens` (FILIP
token embeddings), `input_ids`, `attention_mask` (trimmed), `image_id`, `batch`, and
`model` for the fusion layers (`model.text.fuse`, `model.itm_head`) or the decoder.
`needs` names what the model must build for it: "tokens" (the FILIP token projections),
"fusion" (fusion layers and the ITM head), "decoder" (the captioning decoder).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from vlp.errors import ConfigError


@dataclass
class ObjectiveOptions:
    # Weight in the total loss; 0 turns the objective off (nothing of it is built or run).
    weight: float = 1.0
    # Curriculum: the objective joins when this fraction of the run is done (0: from the
    # start) and its weight then grows linearly to `weight` over the next `ramp` of the run;
    # it leaves at `end` (1: it runs to the end). ITC with end 0.8 and ITM with start 0.8
    # make ITM a second stage on the towers ITC trained (docs/training.md).
    start: float = 0.0
    ramp: float = 0.0
    end: float = 1.0

    @property
    def trains_towers(self) -> bool:
        """Whether this objective's gradient reaches the towers (ITC, FILIP, SigLIP: always)."""
        return True


@dataclass
class OwnLayersOptions(ObjectiveOptions):
    """Options of an objective with layers of its own on the towers' states (ITM's fusion
    layers, the captioning decoder)."""
    # false: the tower states reach the objective detached, so its gradient trains only its
    # own layers and the towers learn from ITC/FILIP alone (the towers limit what ITM
    # learns, not the reverse: docs/training.md); its backward also stops at the towers.
    tower_gradients: bool = True

    @property
    def trains_towers(self) -> bool:
        return self.tower_gradients

    def from_towers(self, states: torch.Tensor) -> torch.Tensor:
        """`states` of a tower as this objective may use them."""
        return states if self.tower_gradients else states.detach()


class Objective(nn.Module):
    name: ClassVar[str]
    Options: ClassVar[type] = ObjectiveOptions
    needs: ClassVar[frozenset[str]] = frozenset()
    # Which scoring API's temperature this objective learns ("embeddings" for encode_image /
    # encode_text, "tokens" for FILIP), so zero-shot can turn scores into probabilities.
    scale_for: ClassVar[str | None] = None

    def __init__(self, options, loss_cfg) -> None:
        """`options`: this objective's `Options`; `loss_cfg`: the shared loss settings
        (init_temperature, max_logit_scale)."""
        super().__init__()
        self.options = options

    def start_training(self, global_batch_size: int) -> None:
        """Called once by the trainer on a fresh run, before the optimizer copies the weights:
        initializations that depend on the batch (SigLIP's bias) happen here."""

    def set_progress(self, step: int, progress: float) -> None:
        """Called by the trainer before each step; objectives with a schedule of their own
        (ITM's negative hardness) follow it."""

    def logit_scale(self) -> torch.Tensor:
        raise NotImplementedError(f"objective {self.name} has no logit scale")

    def forward(self, features) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def linear_ramp(progress: float, start: float, length: float) -> float:
    """0 before `start`, then up linearly to 1 over `length` (fractions of the run; a length
    of 0 jumps to 1 at `start`)."""
    if progress < start:
        return 0.0
    if length <= 0:
        return 1.0
    return min(1.0, (progress - start) / length)


def schedule_multiplier(options: ObjectiveOptions, progress: float) -> float:
    """The curriculum factor in [0, 1] of an objective at `progress` (fraction of the run)."""
    if progress >= options.end:
        return 0.0
    return linear_ramp(progress, options.start, options.ramp)


def schedule_segments(options: dict[str, ObjectiveOptions]) -> list[tuple[float, float]]:
    """The stretches of the run within which no objective joins or leaves."""
    bounds = sorted({0.0, 1.0, *(o.start for o in options.values()), *(o.end for o in options.values())})
    return list(zip(bounds, bounds[1:]))


def check_schedules(options: dict[str, ObjectiveOptions]) -> None:
    """Each objective's start/ramp/end make sense, and at every point of the run at least
    one objective runs (a step with no loss has nothing to train)."""
    for name, opts in options.items():
        if not (0.0 <= opts.start < opts.end <= 1.0 and opts.ramp >= 0.0):
            raise ConfigError(f"loss.{name}: need 0 <= start < end <= 1 and ramp >= 0, got "
                              f"start={opts.start}, end={opts.end}, ramp={opts.ramp}")
    for left, right in schedule_segments(options):
        middle = (left + right) / 2
        if not any(o.start <= middle < o.end for o in options.values()):
            raise ConfigError(f"no objective runs from {left:g} to {right:g} of the run: move an "
                              f"objective's loss.<name>.start or .end to cover it "
                              f"(configured: {', '.join(f'{n} {o.start:g}-{o.end:g}' for n, o in options.items())})")

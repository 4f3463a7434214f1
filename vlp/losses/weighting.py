"""Combining the objectives: total = Σₖ cₖ · mₖ(progress) · wₖ · Lₖ.

cₖ is the configured weight (`loss.<name>.weight`), mₖ the objective's curriculum factor
(`start` / `ramp`), and wₖ the balancing rule's weight (`loss.weighting`):

- `fixed`: wₖ = 1.
- `uncertainty` (Kendall, Gal & Cipolla 2018): learned log-variances sₖ, total term
  cₖ mₖ (exp(−sₖ) Lₖ + sₖ); a noisy objective learns to down-weight itself.
- `dwa`, dynamic weight average (Liu, Johns & Davison 2019): wₖ = K·softmax(rₖ / T) with
  rₖ = Lₖ(t−1) / Lₖ(t−2), the ratio of the objective's mean losses over the last two windows
  of `loss.balance_window` training passes; w = 1 for the first two windows. An objective
  whose loss falls slowly gets more weight.
- `gradnorm` (Chen et al. 2018): wₖ learned so that each objective's gradient norm at a
  shared layer, Gₖ = wₖ‖∇_W Lₖ‖, approaches mean(G)·rₖ^α with rₖ = (Lₖ/Lₖ(0)) / mean(L/L(0)):
  objectives that trained less get larger gradients. The weights take their own Adam step
  on L_grad = Σₖ |Gₖ − target| (target constant) and are renormalized to Σw = K.

DWA and GradNorm state (window sums, weights, Adam moments) is module "extra state": it is
checkpointed and restored with the model, and stays float32 when DeepSpeed casts the model
to bf16. Values are averaged over ranks before they change a weight, so every rank uses
the same weights. Under dwa/gradnorm the configured weights still multiply (dwa) or only
switch objectives on (gradnorm equalizes gradient norms, which undoes any constant factor).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from vlp.errors import ConfigError
from vlp.losses.distributed import world
from vlp.losses.objective import ObjectiveOptions, check_schedules, schedule_multiplier

MODES = ("fixed", "uncertainty", "dwa", "gradnorm")
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


class LossWeighting(nn.Module):
    def __init__(self, options: dict[str, ObjectiveOptions], loss_cfg) -> None:
        super().__init__()
        if loss_cfg.weighting not in MODES:
            raise ConfigError(f"config key 'loss.weighting' must be one of {MODES}, got {loss_cfg.weighting!r}")
        self.mode = loss_cfg.weighting
        self.options = {name: opts for name, opts in options.items() if opts.weight > 0}
        check_schedules(self.options)
        self.names = list(self.options)
        self.temperature, self.window = loss_cfg.dwa_temperature, loss_cfg.balance_window
        self.alpha, self.lr = loss_cfg.gradnorm_alpha, loss_cfg.gradnorm_lr
        self.log_vars = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros(1)) for name in self.names} if self.mode == "uncertainty" else {})
        k = len(self.names)
        self.state = {"balance": torch.ones(k, dtype=torch.float64)}
        if self.mode == "dwa":
            self.state.update(window_sum=torch.zeros(k, dtype=torch.float64), window_n=torch.zeros(k, dtype=torch.float64),
                              history=torch.zeros(2, k, dtype=torch.float64), windows=torch.zeros(k, dtype=torch.float64))
        if self.mode == "gradnorm":
            self.state.update(initial=torch.zeros(k, dtype=torch.float64), m=torch.zeros(k, dtype=torch.float64),
                              v=torch.zeros(k, dtype=torch.float64), updates=torch.zeros(1, dtype=torch.float64))

    # ------------------------------------------------------------------ checkpointed state
    def get_extra_state(self) -> dict[str, torch.Tensor]:
        return {name: value.clone() for name, value in self.state.items()}

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.state = {name: value.to(torch.float64).clone() for name, value in state.items()}

    # ------------------------------------------------------------------ weights
    def multipliers(self, progress: float | None) -> dict[str, float]:
        """cₖ · mₖ(progress): the configured weight under the curriculum; 0 = not run now.
        `progress` None (evaluation): every objective at its configured weight."""
        if progress is None:
            return {name: opts.weight for name, opts in self.options.items()}
        return {name: opts.weight * schedule_multiplier(opts, progress) for name, opts in self.options.items()}

    def forward(self, losses: dict[str, torch.Tensor], multipliers: dict[str, float], training: bool,
                shared_grad_norms: Callable[[list[torch.Tensor]], torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`losses`: the objectives that ran; `shared_grad_norms(losses) -> [len(losses)]`
        ‖∇_W Lₖ‖ at the shared layer (gradnorm, training only)."""
        names = list(losses)
        index = torch.tensor([self.names.index(n) for n in names], dtype=torch.long)
        balance = self.state["balance"][index]
        if training and self.mode == "dwa":
            self._dwa_update(losses, index)
        if training and self.mode == "gradnorm":
            self._gradnorm_update(losses, index, shared_grad_norms([losses[n] for n in names]))
        total, metrics = 0.0, {}
        for i, name in enumerate(names):
            weight = multipliers[name] * float(balance[i])
            if self.mode == "uncertainty":
                log_var = self.log_vars[name].float()[0]
                total = total + multipliers[name] * (torch.exp(-log_var) * losses[name] + log_var)
                weight = multipliers[name] * torch.exp(-log_var).detach()
            else:
                total = total + weight * losses[name]
            metrics[f"weight_{name}"] = torch.as_tensor(weight, dtype=torch.float32).detach()
        return total, metrics

    def _dwa_update(self, losses: dict[str, torch.Tensor], index: torch.Tensor) -> None:
        state = self.state
        values = torch.stack([loss.detach().double().cpu() for loss in losses.values()])
        state["window_sum"][index] += values
        state["window_n"][index] += 1
        full = index[state["window_n"][index] >= self.window]
        if len(full) == 0:
            return
        means = _mean_over_ranks(state["window_sum"][full] / state["window_n"][full])
        state["history"][1, full] = state["history"][0, full]
        state["history"][0, full] = means
        state["windows"][full] += 1
        state["window_sum"][full] = 0
        state["window_n"][full] = 0
        ready = (state["windows"] >= 2)
        if ready.any():
            ratio = state["history"][0, ready] / state["history"][1, ready].clamp(min=1e-12)
            state["balance"][ready] = int(ready.sum()) * torch.softmax(ratio / self.temperature, 0)

    def _gradnorm_update(self, losses: dict[str, torch.Tensor], index: torch.Tensor,
                         grad_norms: torch.Tensor) -> None:
        state = self.state
        values = _mean_over_ranks(torch.stack([loss.detach().double().cpu() for loss in losses.values()]))
        unset = state["initial"][index] == 0
        state["initial"][index[unset]] = values[unset]
        relative = values / state["initial"][index]
        rate = relative / relative.mean()
        weights = state["balance"][index]
        norms = grad_norms.detach().double().cpu()
        g = weights * norms
        target = g.mean() * rate ** self.alpha
        grad = torch.sign(g - target) * norms  # ∂ Σ|Gₖ − target| / ∂wₖ
        state["updates"] += 1
        t = float(state["updates"])
        beta1, beta2 = ADAM_BETAS
        state["m"][index] = beta1 * state["m"][index] + (1 - beta1) * grad
        state["v"][index] = beta2 * state["v"][index] + (1 - beta2) * grad ** 2
        step = self.lr * (state["m"][index] / (1 - beta1 ** t)) / ((state["v"][index] / (1 - beta2 ** t)).sqrt() + ADAM_EPS)
        updated = (weights - step).clamp(min=1e-3)
        state["balance"][index] = updated * len(index) / updated.sum()


def _mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Average of a float64 CPU tensor over ranks (DWA/GradNorm weights must agree)."""
    if world()[1] == 1:
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    reduced = values.to(device)
    dist.all_reduce(reduced)
    return reduced.cpu() / world()[1]

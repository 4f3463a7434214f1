"""Combining the objectives: fixed weights, or learned homoscedastic uncertainty
(Kendall, Gal & Cipolla 2018): total = Σ w_i (exp(-s_i) L_i + s_i) with s_i = log σ_i²,
so a noisy objective learns to down-weight itself and the + s_i term stops s_i running off.
"""
from __future__ import annotations

import torch
from torch import nn


class LossWeighting(nn.Module):
    def __init__(self, weights: dict[str, float], mode: str = "fixed"):
        super().__init__()
        if mode not in ("fixed", "uncertainty"):
            raise ValueError(f"loss weighting must be 'fixed' or 'uncertainty', got {mode!r}")
        self.weights = {name: w for name, w in weights.items() if w > 0}
        self.mode = mode
        self.log_vars = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros(())) for name in self.weights} if mode == "uncertainty" else {})

    def forward(self, losses: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, metrics = 0.0, {}
        for name, loss in losses.items():
            weight = self.weights[name]
            if self.mode == "uncertainty":
                log_var = self.log_vars[name].float().reshape(())
                total = total + weight * (torch.exp(-log_var) * loss + log_var)
                metrics[f"weight_{name}"] = (weight * torch.exp(-log_var)).detach()
            else:
                total = total + weight * loss
        return total, metrics

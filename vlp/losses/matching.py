"""ITM: binary match/no-match on fused pairs, with hard negatives (ALBEF/BLIP).

Negatives are sampled ∝ softmax(ITC logits) with the Gumbel-max trick: one vectorized
argmax, exact in distribution, and no "invalid multinomial distribution" however peaked the
logits are. Pairs that share an image id (the positive included) can never be drawn; a row
with no admissible candidate (batch size 1, or all one image) is flagged invalid instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def sample_hard_negatives(logits: torch.Tensor, forbidden: torch.Tensor,
                          generator: torch.Generator | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """`logits` [R, C] ITC logits, `forbidden` [R, C] bool (same image id).
    Returns (column index [R], valid [R])."""
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-12, 1 - 1e-7)))
    noisy = (logits.float() + gumbel).masked_fill(forbidden, float("-inf"))
    return noisy.argmax(dim=1), ~forbidden.all(dim=1)


def itm_loss(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cross-entropy on the 2-way head over the valid pairs (positives are always valid)."""
    per_pair = F.cross_entropy(logits.float(), labels, reduction="none")
    weight = valid.float()
    loss = (per_pair * weight).sum() / weight.sum().clamp(min=1)
    acc = ((logits.argmax(1) == labels).float() * weight).sum() / weight.sum().clamp(min=1)
    return {"loss": loss, "acc": acc.detach()}

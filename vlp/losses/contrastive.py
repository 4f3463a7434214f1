"""ITC: symmetric InfoNCE over image/text global embeddings (CLIP, ALBEF).

Across ranks each rank scores its local rows against the all-gathered columns, with labels
offset by rank; the mean over ranks equals the loss on the concatenated batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlp.losses.distributed import gather_with_grad, world


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor,
                     logit_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """`image_emb`, `text_emb`: L2-normalized `[b, D]` local features; returns loss, acc."""
    rank, _ = world()
    all_image = gather_with_grad(image_emb)
    all_text = gather_with_grad(text_emb)
    logits_i2t = logit_scale * image_emb.float() @ all_text.float().t()
    logits_t2i = logit_scale * text_emb.float() @ all_image.float().t()
    labels = torch.arange(image_emb.shape[0], device=image_emb.device) + rank * image_emb.shape[0]
    loss = 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))
    acc = 0.5 * ((logits_i2t.argmax(1) == labels).float().mean()
                 + (logits_t2i.argmax(1) == labels).float().mean())
    return {"loss": loss, "acc": acc.detach()}


class LearnableScale(nn.Module):
    """s = exp(t), t0 = ln(1/T0); clamped so the logits cannot blow up (CLIP caps s at 100)."""

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_scale = max_scale

    def forward(self) -> torch.Tensor:
        # reshape: the trainer may hand DeepSpeed this parameter as shape [1].
        return self.log_scale.float().exp().clamp(max=self.max_scale).reshape(())


class ContrastiveLoss(nn.Module):
    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0):
        super().__init__()
        self.scale = LearnableScale(init_temperature, max_scale)

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> dict[str, torch.Tensor]:
        scale = self.scale()
        out = contrastive_loss(image_emb, text_emb, scale)
        out["logit_scale"] = scale.detach()
        return out

"""ITC: symmetric InfoNCE over image/text global embeddings (CLIP, ALBEF).

Across ranks each rank scores its local rows against the all-gathered columns, with labels
offset by rank; the mean over ranks equals the loss on the concatenated batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlp.errors import ConfigError
from vlp.losses.distributed import gather_rows, gather_with_grad, world
from vlp.losses.objective import Objective, ObjectiveOptions, linear_ramp


def symmetric_cross_entropy(logits_i2t: torch.Tensor, logits_t2i: torch.Tensor, labels: torch.Tensor,
                            drop_hardest: float = 0.0) -> dict[str, torch.Tensor]:
    """½(CE over image rows + CE over text rows) and the mean top-1 accuracy of both.
    `drop_hardest`: the share of pairs, those with the highest loss, left out of the mean."""
    pair_loss = 0.5 * (F.cross_entropy(logits_i2t, labels, reduction="none")
                       + F.cross_entropy(logits_t2i, labels, reduction="none"))
    dropped = int(drop_hardest * pair_loss.shape[0])
    if dropped:
        pair_loss = pair_loss[pair_loss.detach().argsort()[:-dropped]]
    acc = 0.5 * ((logits_i2t.argmax(1) == labels).float().mean()
                 + (logits_t2i.argmax(1) == labels).float().mean())
    return {"loss": pair_loss.mean(), "acc": acc.detach()}


def local_labels(b: int, device) -> torch.Tensor:
    """Column of each local row's positive among the all-gathered columns."""
    return torch.arange(b, device=device) + world()[0] * b


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                     negative_emb: torch.Tensor | None = None, drop_hardest: float = 0.0) -> dict[str, torch.Tensor]:
    """`image_emb`, `text_emb`: L2-normalized `[b, D]` local features; returns loss, acc.
    `negative_emb` `[n, D]`: hard negative captions, extra columns for every image (never
    a positive, and not rows: they have no image of their own). `drop_hardest`: see
    `ITCOptions`; a dropped pair's image and caption stay columns of the others."""
    all_image = gather_with_grad(image_emb)
    all_text = gather_with_grad(text_emb)
    logits_i2t = logit_scale * image_emb.float() @ all_text.float().t()
    logits_t2i = logit_scale * text_emb.float() @ all_image.float().t()
    if negative_emb is not None:
        logits_i2t = torch.cat([logits_i2t, negative_columns(logit_scale * image_emb.float(), negative_emb)], 1)
    return symmetric_cross_entropy(logits_i2t, logits_t2i, local_labels(image_emb.shape[0], image_emb.device),
                                   drop_hardest)


def negative_columns(scaled_image_emb: torch.Tensor, negative_emb: torch.Tensor) -> torch.Tensor:
    """Logits of local images against every rank's hard negative captions `[b, N]`; the
    pads of ranks with fewer negatives are -inf (they take no probability mass)."""
    all_negatives, valid = gather_rows(negative_emb)
    logits = scaled_image_emb @ all_negatives.float().t()
    return logits.masked_fill(~valid[None], float("-inf"))


class LearnableScale(nn.Module):
    """s = exp(t), t0 = ln(init), clamped so the logits cannot blow up (CLIP caps s at 100).
    Shape [1], not 0-d: DeepSpeed broadcasts and partitions parameters through byte views,
    which a 0-d tensor cannot give."""

    def __init__(self, init_scale: float, max_scale: float = 100.0):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor([math.log(init_scale)]))
        self.max_scale = max_scale

    def forward(self) -> torch.Tensor:
        return self.log_scale.float().exp().clamp(max=self.max_scale)[0]


@dataclass
class ITCOptions(ObjectiveOptions):
    # Noisy pairs (web alt-text): this share of each batch's pairs, those with the highest
    # loss, is left out of the loss (the small-loss trick of co-teaching: a wrong caption is
    # fitted later than the right ones). It grows linearly from 0 over `drop_ramp` of the
    # run, since at the start every pair's loss is high. Each rank drops its own share.
    drop_hardest: float = 0.0
    drop_ramp: float = 0.25


class ITC(Objective):
    """Softmax contrastive loss on the global embeddings, with a learnable temperature."""
    name = "itc"
    Options = ITCOptions
    scale_for = "embeddings"

    def __init__(self, options: ITCOptions, loss_cfg) -> None:
        super().__init__(options, loss_cfg)
        self.scale = LearnableScale(1.0 / loss_cfg.init_temperature, loss_cfg.max_logit_scale)
        if not 0.0 <= options.drop_hardest < 1.0:
            raise ConfigError(f"config key 'loss.itc.drop_hardest' must be in [0, 1), got {options.drop_hardest}")
        if not 0.0 <= options.drop_ramp <= 1.0:
            raise ConfigError(f"config key 'loss.itc.drop_ramp' must be in [0, 1], got {options.drop_ramp}")
        self.drop_share = 0.0

    def set_progress(self, step: int, progress: float) -> None:
        self.drop_share = self.options.drop_hardest * linear_ramp(progress, 0.0, self.options.drop_ramp)

    def logit_scale(self) -> torch.Tensor:
        return self.scale()

    def forward(self, features) -> dict[str, torch.Tensor]:
        scale = self.scale()
        drop = self.drop_share if self.training else 0.0
        out = contrastive_loss(features.image_emb, features.text_emb, scale, features.negative_text_emb, drop)
        if self.options.drop_hardest:
            out["dropped_share"] = torch.tensor(drop)
        out["logit_scale"] = scale.detach()
        return out

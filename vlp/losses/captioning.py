"""Captioning LM loss: next-token cross-entropy with label smoothing; pads ignored."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def lm_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t+1; pads (and the last position) get IGNORE."""
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, IGNORE)
    return F.pad(targets, (0, 1), value=IGNORE)


def caption_loss(logits: torch.Tensor, targets: torch.Tensor,
                 label_smoothing: float = 0.1) -> dict[str, torch.Tensor]:
    """`logits` [B,T,V], `targets` [B,T] with IGNORE on positions that carry no loss."""
    flat_logits, flat_targets = logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)
    loss = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE,
                           label_smoothing=label_smoothing)
    scored = flat_targets != IGNORE
    acc = (flat_logits.argmax(-1)[scored] == flat_targets[scored]).float().mean()
    return {"loss": loss, "acc": acc.detach()}

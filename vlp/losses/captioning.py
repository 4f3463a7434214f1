"""Captioning LM loss: next-token cross-entropy with label smoothing; pads ignored."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlp.errors import ConfigError
from vlp.losses.objective import Objective, OwnLayersOptions
from vlp.padding import trim_padding

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


@dataclass
class LMOptions(OwnLayersOptions):
    label_smoothing: float = 0.1
    # Caption this fraction of each training batch (its first pairs; batches are shuffled).
    # The decoder and its vocabulary projection are the costliest objective: on the demo,
    # 0.5 makes a four-objective step ~1.35x faster. Evaluation captions every pair.
    batch_fraction: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.batch_fraction <= 1:
            raise ConfigError(f"config key 'loss.lm.batch_fraction' must be in (0, 1], got {self.batch_fraction}")


class LM(Objective):
    """BLIP's captioning loss: the decoder, conditioned on the image states, predicts each
    next caption token."""
    name = "lm"
    Options = LMOptions
    needs = frozenset({"decoder"})

    def forward(self, features) -> dict[str, torch.Tensor]:
        decoder = features.model.decoder
        input_ids, attention_mask = features.input_ids, features.attention_mask
        fraction = self.options.batch_fraction if self.training else 1.0
        n = max(1, math.ceil(fraction * input_ids.shape[0]))
        input_ids, attention_mask = trim_padding(input_ids[:n], attention_mask[:n])
        hidden = decoder.hidden(input_ids, attention_mask, self.options.from_towers(features.image_states[:n]))
        targets = lm_targets(input_ids, attention_mask)
        scored = targets != IGNORE  # the vocabulary projection only where a token is predicted
        return caption_loss(decoder.logits(hidden[scored]), targets[scored], self.options.label_smoothing)

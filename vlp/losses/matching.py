"""ITM: binary match/no-match on fused pairs, with hard negatives (ALBEF/BLIP).

Negatives are sampled ∝ softmax(ITC logits) with the Gumbel-max trick: one vectorized
argmax, exact in distribution, and no "invalid multinomial distribution" however peaked the
logits are. Pairs that share an image id (the positive included) can never be drawn; a row
with no admissible candidate (batch size 1, or all one image) is flagged invalid instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlp.losses.distributed import gather_no_grad, gather_padded, gather_with_grad, world
from vlp.losses.objective import Objective, OwnLayersOptions, linear_ramp


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


@dataclass
class ITMOptions(OwnLayersOptions):
    # Negatives from the whole global batch (all ranks), not only this rank's.
    global_negatives: bool = True
    # Negatives are drawn ∝ softmax(hardness · ITC logits); hardness ramps linearly from 0
    # (uniform: easy negatives) to 1 (ALBEF/BLIP's hard negatives) over this many steps.
    # From the first step, hard negatives are near-copies of the positives the new fusion
    # layers cannot yet tell apart, and ITM settles at the constant 1:2 guess.
    hard_negatives_warmup: int = 0
    # The same ramp as a fraction of the run counted from when ITM joins (its `start`), so it
    # follows a time budget (train.max_minutes) and a late start begins with easy negatives;
    # 0: hard_negatives_warmup steps.
    hard_negatives_warmup_fraction: float = 0.0


class ITM(Objective):
    """Positives, plus one hard negative text per image and one hard negative image per
    text (from the global batch when gathering is on): 3b pairs through the fusion layers
    and the model's 2-way ITM head."""
    name = "itm"
    Options = ITMOptions
    needs = frozenset({"fusion"})

    def __init__(self, options: ITMOptions, loss_cfg) -> None:
        super().__init__(options, loss_cfg)
        self.hardness = 1.0

    def set_progress(self, step: int, progress: float) -> None:
        options = self.options
        if options.hard_negatives_warmup_fraction > 0:
            self.hardness = linear_ramp(progress, options.start, options.hard_negatives_warmup_fraction)
        elif options.hard_negatives_warmup > 0:
            self.hardness = min(1.0, step / options.hard_negatives_warmup)
        else:
            self.hardness = 1.0

    def forward(self, features) -> dict[str, torch.Tensor]:
        model = features.model
        towers = self.options.from_towers
        image_states, text_states = towers(features.image_states), towers(features.text_states)
        mask = features.attention_mask
        image_emb, text_emb, image_id = features.image_emb.detach(), features.text_emb.detach(), features.image_id
        if self.options.global_negatives and world()[1] > 1:
            text_states, mask, all_texts, all_mask = gather_padded(text_states, mask)
            all_images = gather_with_grad(image_states)
            all_ids, all_image_emb, all_text_emb = map(gather_no_grad, (image_id, image_emb, text_emb))
        else:
            all_images, all_texts, all_mask, all_ids = image_states, text_states, mask, image_id
            all_image_emb, all_text_emb = image_emb, text_emb
        scale = model.logit_scale * self.hardness
        same = image_id[:, None] == all_ids[None, :]  # [b, B]: the positive and duplicates
        neg_text, text_ok = sample_hard_negatives(scale * image_emb @ all_text_emb.t(), same)
        neg_image, image_ok = sample_hard_negatives(scale * text_emb @ all_image_emb.t(), same)
        texts = [text_states, all_texts[neg_text], text_states]
        masks = [mask, all_mask[neg_text], mask]
        images = [image_states, image_states, all_images[neg_image]]
        b = image_states.shape[0]
        valid = [torch.ones(b, dtype=torch.bool, device=mask.device), text_ok, image_ok]
        if features.negatives is not None:  # composition-aware negatives: their own image
            texts.append(towers(features.negative_text_states))
            masks.append(features.negative_mask)
            images.append(image_states[features.negative_owner])
            valid.append(torch.ones(len(features.negative_owner), dtype=torch.bool, device=mask.device))
        texts, masks = _pad_to_one_length(texts, masks)
        fused = model.text.fuse(torch.cat(texts), torch.cat(masks), torch.cat(images))[:, 0]
        valid = torch.cat(valid)
        labels = (torch.arange(len(valid), device=fused.device) < b).long()
        return itm_loss(model.itm_head(fused), labels, valid)


def _pad_to_one_length(states: list[torch.Tensor], masks: list[torch.Tensor]):
    """Text states / masks of different caption lengths, right-padded to the longest."""
    length = max(m.shape[1] for m in masks)
    return ([F.pad(x, (0, 0, 0, length - x.shape[1])) for x in states],
            [F.pad(m, (0, length - m.shape[1])) for m in masks])

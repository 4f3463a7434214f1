"""Scoring many (image, text) pairs through the model's scoring API, in batches."""
from __future__ import annotations

import torch

from vlp.padding import trim_padding


@torch.no_grad()
def itm_pair_scores(model, image_states: torch.Tensor, text_states: torch.Tensor,
                    mask: torch.Tensor, image_of_pair: torch.Tensor, text_of_pair: torch.Tensor,
                    batch_size: int) -> torch.Tensor:
    """ITM match probability of each pair (image_of_pair[p], text_of_pair[p]) → [P] float
    on the CPU. The towers ran once (`encode_image_states` / `encode_text_states`); only
    the fusion layers see each pair."""
    scores = torch.empty(len(image_of_pair))
    for start in range(0, len(image_of_pair), batch_size):
        i = image_of_pair[start:start + batch_size]
        t = text_of_pair[start:start + batch_size]
        states, pair_mask = trim_padding(text_states[t], mask[t])
        scores[start:start + batch_size] = model.itm_scores(
            attention_mask=pair_mask, image_states=image_states[i], text_states=states).float().cpu()
    return scores

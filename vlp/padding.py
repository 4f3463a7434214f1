"""Captions come right-padded to data.max_len; the padded tail only costs time."""
from __future__ import annotations

import torch


def trim_padding(tokens: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drops the token positions (dim 1 of `tokens`: ids or states) that are padding in every
    row."""
    length = max(int(attention_mask.sum(1).max()), 1)
    return tokens[:, :length], attention_mask[:, :length]

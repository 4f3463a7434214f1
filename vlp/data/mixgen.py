"""MixGen (Hao et al., "MixGen: A New Multi-Modal Data Augmentation", WACV-W 2023)."""
from __future__ import annotations

import random

import torch


def mixgen(images: torch.Tensor, texts: list[str], prob: float, lam: float,
           rng: random.Random) -> tuple[torch.Tensor, list[str]]:
    """Each sample, with probability `prob`, becomes a blend `lam·own + (1-lam)·other` of its
    image with another sample's image, and its caption gets the other's caption appended.
    Mixing happens before tokenization so the joined caption is truncated like any other."""
    n = len(texts)
    if prob <= 0.0 or n < 2:
        return images, texts
    pairs = []
    for i in range(n):
        if rng.random() < prob:
            j = rng.randrange(n - 1)
            pairs.append((i, j + (j >= i)))
    if not pairs:
        return images, texts
    own, other = (torch.tensor(p) for p in zip(*pairs))
    blended = lam * images[own].float() + (1.0 - lam) * images[other].float()
    if not images.is_floating_point():  # uint8 batches: round, don't truncate
        blended = blended.round_()
    mixed = images.clone()
    mixed[own] = blended.to(images.dtype)
    mixed_texts = list(texts)
    for i, j in pairs:
        mixed_texts[i] = f"{texts[i]} {texts[j]}"
    return mixed, mixed_texts

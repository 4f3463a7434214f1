"""FILIP token-wise late interaction (Yao et al. 2021).

image→text score: mean over image tokens of the max over the text's *real* tokens (pads are
-inf before the max: a zeroed pad would beat every negative token). text→image score: masked
mean over real text tokens of the max over image tokens. The two matrices are not
transposes of each other. Similarities run in reduced precision, one chunk of texts at a
time, so memory never holds B_img × B_txt × N_img × N_txt at once.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlp.losses.contrastive import LearnableScale
from vlp.losses.distributed import gather_no_grad, gather_with_grad, max_over_ranks, world

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def filip_similarity(image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                     chunk: int = 64, dtype: torch.dtype = torch.float32
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`image_tokens` [Bi,P,D], `text_tokens` [Bt,Q,D], `text_mask` [Bt,Q] (1 = real token).
    Returns (i2t, t2i), both float32 `[Bi, Bt]`."""
    real = text_mask.bool()
    n_real = real.sum(1).clamp(min=1).float()
    image = image_tokens.to(dtype)
    i2t_parts, t2i_parts = [], []
    for start in range(0, text_tokens.shape[0], chunk):
        text = text_tokens[start:start + chunk].to(dtype)
        keep = real[start:start + chunk]
        sim = torch.einsum("ipd,tqd->itpq", image, text)  # [Bi, C, P, Q]
        # max(dim), not amax: its backward keeps only the argmax indices, so autograd does
        # not hold on to every chunk's [Bi, C, P, Q] similarity until the backward pass.
        best_text = sim.masked_fill(~keep[None, :, None, :], float("-inf")).max(-1).values
        i2t_parts.append(best_text.float().mean(-1))
        best_image = sim.max(2).values.float()  # [Bi, C, Q]
        t2i_parts.append((best_image * keep[None]).sum(-1) / n_real[start:start + chunk][None])
    return torch.cat(i2t_parts, 1), torch.cat(t2i_parts, 1)


@torch.no_grad()
def select_tokens(image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                  fraction: float, chunk: int = 64, dtype: torch.dtype = torch.float32
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices of the tokens to keep (FILIP §3.1.2): per image the top `fraction` of tokens by
    their best similarity to any real token of the local texts, per text the top `fraction`
    by best similarity to any local image token (pads rank last and stay masked).
    Returns (image_index [Bi,k_i], text_index [Bt,k_t], kept text mask [Bt,k_t])."""
    real = text_mask.bool()
    image = image_tokens.to(dtype)
    image_score = torch.full(image_tokens.shape[:2], float("-inf"), device=image_tokens.device)
    text_scores = []
    for start in range(0, text_tokens.shape[0], chunk):
        keep = real[start:start + chunk]
        sim = torch.einsum("ipd,tqd->itpq", image, text_tokens[start:start + chunk].to(dtype))
        sim = sim.masked_fill(~keep[None, :, None, :], float("-inf"))
        image_score = torch.maximum(image_score, sim.amax(dim=(1, 3)).float())
        text_scores.append(sim.amax(dim=(0, 2)).float())
    text_score = torch.cat(text_scores).masked_fill(~real, float("-inf"))
    k_image = max(1, math.ceil(fraction * image_tokens.shape[1]))
    k_text = max(1, math.ceil(fraction * text_tokens.shape[1]))
    image_index = image_score.topk(k_image, dim=1).indices
    text_index = text_score.topk(k_text, dim=1).indices
    return image_index, text_index, real.gather(1, text_index)


def _take(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))


def filip_loss(image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
               logit_scale: torch.Tensor, token_fraction: float = 1.0, chunk: int = 64,
               dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Local tokens against all-gathered tokens; tokens L2-normalized per token."""
    rank, world_size = world()
    b = image_tokens.shape[0]
    if token_fraction < 1.0:
        image_index, text_index, text_mask = select_tokens(
            image_tokens, text_tokens, text_mask, token_fraction, chunk, dtype)
        image_tokens, text_tokens = _take(image_tokens, image_index), _take(text_tokens, text_index)
    text_mask = text_mask.bool()
    if world_size == 1:
        i2t, t2i = filip_similarity(image_tokens, text_tokens, text_mask, chunk, dtype)
        t2i = t2i.t()
    else:
        # Text lengths may differ between ranks; pad to a common length (pads are masked).
        length = max_over_ranks(text_tokens.shape[1])
        text_tokens = F.pad(text_tokens, (0, 0, 0, length - text_tokens.shape[1]))
        text_mask = F.pad(text_mask, (0, length - text_mask.shape[1]))
        all_text, all_mask = gather_with_grad(text_tokens), gather_no_grad(text_mask)
        i2t, _ = filip_similarity(image_tokens, all_text, all_mask, chunk, dtype)
        _, t2i = filip_similarity(gather_with_grad(image_tokens), text_tokens, text_mask, chunk, dtype)
        t2i = t2i.t()
    labels = torch.arange(b, device=image_tokens.device) + rank * b
    logits_i2t, logits_t2i = logit_scale * i2t, logit_scale * t2i
    loss = 0.5 * (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels))
    acc = 0.5 * ((logits_i2t.argmax(1) == labels).float().mean()
                 + (logits_t2i.argmax(1) == labels).float().mean())
    return {"loss": loss, "acc": acc.detach()}


class FilipLoss(nn.Module):
    """FILIP loss with its own learnable temperature."""

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0,
                 token_fraction: float = 1.0, chunk: int = 64, precision: str = "bf16"):
        super().__init__()
        self.scale = LearnableScale(init_temperature, max_scale)
        self.token_fraction, self.chunk, self.dtype = token_fraction, chunk, DTYPES[precision]

    def forward(self, image_tokens, text_tokens, text_mask) -> dict[str, torch.Tensor]:
        scale = self.scale()
        out = filip_loss(image_tokens, text_tokens, text_mask, scale, self.token_fraction,
                         self.chunk, self.dtype)
        out["logit_scale"] = scale.detach()
        return out

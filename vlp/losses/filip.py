"""FILIP token-wise late interaction (Yao et al. 2021).

image→text score: mean over image tokens of the max over the text's *real* tokens (pads are
-inf before the max: a zeroed pad would beat every negative token). text→image score: masked
mean over real text tokens of the max over image tokens. The two matrices are not
transposes of each other. Similarities run in reduced precision, one chunk of texts at a
time, so memory never holds B_img × B_txt × N_img × N_txt at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlp.errors import ConfigError
from vlp.dtypes import DTYPES
from vlp.losses.contrastive import LearnableScale, local_labels, symmetric_cross_entropy
from vlp.losses.distributed import gather_padded, gather_rows, gather_with_grad, max_over_ranks, world
from vlp.losses.objective import Objective, ObjectiveOptions



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
               dtype: torch.dtype = torch.float32, negatives: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> dict[str, torch.Tensor]:
    """Local tokens against all-gathered tokens; tokens L2-normalized per token.
    `negatives`: (tokens [n, L, D], mask [n, L]) of hard negative captions, extra columns
    of the image→text scores."""
    if token_fraction < 1.0:
        image_index, text_index, text_mask = select_tokens(
            image_tokens, text_tokens, text_mask, token_fraction, chunk, dtype)
        image_tokens, text_tokens = _take(image_tokens, image_index), _take(text_tokens, text_index)
    if world()[1] == 1:  # one pass gives both directions
        i2t, t2i = filip_similarity(image_tokens, text_tokens, text_mask, chunk, dtype)
    else:
        text_tokens, text_mask, all_text, all_mask = gather_padded(text_tokens, text_mask.bool())
        i2t, _ = filip_similarity(image_tokens, all_text, all_mask, chunk, dtype)
        _, t2i = filip_similarity(gather_with_grad(image_tokens), text_tokens, text_mask, chunk, dtype)
    if negatives is not None:
        i2t = torch.cat([i2t, negative_scores(image_tokens, *negatives, chunk, dtype)], 1)
    labels = local_labels(image_tokens.shape[0], image_tokens.device)
    return symmetric_cross_entropy(logit_scale * i2t, logit_scale * t2i.t(), labels)


def negative_scores(image_tokens: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, chunk: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """image→text FILIP scores `[b, N]` of local images against every rank's hard negative
    captions; ranks' pads are -inf."""
    length = max_over_ranks(tokens.shape[1])  # all-gathers need one token length
    tokens = F.pad(tokens, (0, 0, 0, length - tokens.shape[1]))
    mask = F.pad(mask.bool(), (0, length - mask.shape[1]))
    all_tokens, valid = gather_rows(tokens)
    all_mask, _ = gather_rows(mask, with_grad=False)
    i2t, _ = filip_similarity(image_tokens, all_tokens, all_mask, chunk, dtype)
    return i2t.masked_fill(~valid[None], float("-inf"))


@dataclass
class FilipOptions(ObjectiveOptions):
    # Token similarities in this dtype, this many texts at a time. "auto": the run's
    # precision (bf16 in a bf16 run; fp32 in an fp32 run, where bf16 similarities cost a CPU
    # without bf16 instructions more, not less, and in fp32 inference).
    precision: str = "auto"
    chunk: int = 64
    # Fraction of image/text tokens kept (by similarity) before the gather; FILIP §3.1.2.
    token_fraction: float = 1.0

    def __post_init__(self) -> None:
        allowed = ("auto", *DTYPES)
        if self.precision not in allowed:
            raise ConfigError(f"config key 'loss.filip.precision' must be one of {allowed}, "
                              f"got {self.precision!r}")
        if not 0.0 < self.token_fraction <= 1.0:
            raise ConfigError("config key 'loss.filip.token_fraction' must be in (0, 1]")


class Filip(Objective):
    """FILIP token-wise loss with its own learnable temperature."""
    name = "filip"
    Options = FilipOptions
    needs = frozenset({"tokens"})
    scale_for = "tokens"

    def __init__(self, options: FilipOptions, loss_cfg) -> None:
        super().__init__(options, loss_cfg)
        self.scale = LearnableScale(1.0 / loss_cfg.init_temperature, loss_cfg.max_logit_scale)
        self.fixed_dtype = DTYPES.get(options.precision)  # None: "auto"

    def similarity_dtype(self) -> torch.dtype:
        # The run's precision is the dtype the engine stored this module's weights in.
        return self.fixed_dtype or self.scale.log_scale.dtype

    def logit_scale(self) -> torch.Tensor:
        return self.scale()

    def forward(self, features) -> dict[str, torch.Tensor]:
        scale = self.scale()
        negatives = features.negative_text_tokens
        out = filip_loss(features.image_tokens, features.text_tokens, features.attention_mask, scale,
                         self.options.token_fraction, self.options.chunk, self.similarity_dtype(),
                         None if negatives is None else (negatives, features.negative_mask))
        out["logit_scale"] = scale.detach()
        return out

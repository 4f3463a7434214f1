"""Sigmoid contrastive loss (SigLIP, Zhai et al. 2023) on the global embeddings.

loss = −(1/B) Σᵢ Σⱼ log σ(zᵢⱼ (t·xᵢ·yⱼ + b)), zᵢⱼ = +1 for the image's own caption and −1
for every other, t = exp(t′) with t′₀ = log 10 and a learnable bias b. The bias starts at the prior
log-odds of a pair being positive, b₀ = −log(B − 1) for a global batch of B, so the start,
when almost every pair is a negative, is not a flood of large gradients. The paper's
b₀ = −10 is this rule at its 32k batches; at a CPU batch of 64 the rule gives −4.1, and −10
there costs a short run most of its steps (AdamW moves a scalar by about the LR a step). Each pair
is its own binary problem: no softmax over the batch, which is why it holds up at small
batch sizes. Normalized by the number of images.

Across ranks each rank scores its own images against every rank's captions, gathered with
gradients; the mean of the ranks' losses equals the loss of the concatenated batch, and
averaging gradients over ranks (DeepSpeed) gives its gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlp.losses.contrastive import LearnableScale, local_labels, negative_columns
from vlp.losses.distributed import gather_with_grad
from vlp.losses.objective import Objective, ObjectiveOptions


def sigmoid_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                 bias: torch.Tensor, negative_emb: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """`image_emb`, `text_emb`: L2-normalized `[b, D]` local features; `negative_emb`: hard
    negative captions, more pairs with z = −1 for every image."""
    all_text = gather_with_grad(text_emb)
    logits = logit_scale * image_emb.float() @ all_text.float().t() + bias
    labels = local_labels(image_emb.shape[0], image_emb.device)
    signs = -torch.ones_like(logits)
    signs[torch.arange(len(labels)), labels] = 1.0
    loss = -F.logsigmoid(signs * logits).sum() / image_emb.shape[0]
    if negative_emb is not None:
        negatives = negative_columns(logit_scale * image_emb.float(), negative_emb) + bias
        loss = loss - F.logsigmoid(-negatives).sum() / image_emb.shape[0]  # -inf pads add 0
    acc = (logits.argmax(1) == labels).float().mean()
    return {"loss": loss, "acc": acc.detach()}


PAPER_BIAS = -10.0  # until start_training knows the batch (a loaded model overwrites it)


def prior_bias(global_batch_size: int) -> float:
    """Log-odds that a pair is the positive one when each image has one caption in B."""
    return -math.log(max(1, global_batch_size - 1))


@dataclass
class SigLIPOptions(ObjectiveOptions):
    weight: float = 0.0  # off unless asked for: `loss.siglip=1 loss.itc=0` swaps ITC for it
    init_scale: float = 10.0
    # None: −log(global batch − 1), set when training starts; a number fixes it.
    init_bias: float | None = None


class SigLIP(Objective):
    name = "siglip"
    Options = SigLIPOptions
    scale_for = "embeddings"

    def __init__(self, options: SigLIPOptions, loss_cfg) -> None:
        super().__init__(options, loss_cfg)
        self.scale = LearnableScale(options.init_scale, loss_cfg.max_logit_scale)
        self.bias = nn.Parameter(torch.tensor([PAPER_BIAS if options.init_bias is None else options.init_bias]))

    def start_training(self, global_batch_size: int) -> None:
        if self.options.init_bias is None:
            with torch.no_grad():
                self.bias.fill_(prior_bias(global_batch_size))

    def logit_scale(self) -> torch.Tensor:
        return self.scale()

    def forward(self, features) -> dict[str, torch.Tensor]:
        scale = self.scale()
        out = sigmoid_loss(features.image_emb, features.text_emb, scale, self.bias.float()[0],
                           features.negative_text_emb)
        out.update(logit_scale=scale.detach(), bias=self.bias.detach().float()[0])
        return out

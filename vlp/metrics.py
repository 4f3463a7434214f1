"""Ranking metrics shared by training evaluation, the retrieval index and zero-shot."""
from __future__ import annotations

import numpy as np
import torch

RECALL_KS = (1, 5, 10)


def retrieval_recall(scores: torch.Tensor, text_to_image: torch.Tensor,
                     ks: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
    """Image-text retrieval recall from a score matrix.

    scores: [n_images, n_texts], higher is better. text_to_image: [n_texts], the index of
    the image each text describes (an image may have several texts).
    i2t R@k: an image counts as found when any of its texts is in its top k.
    t2i R@k: a text counts as found when its image is in its top k.
    """
    n_images, n_texts = scores.shape
    if text_to_image.shape != (n_texts,):
        raise ValueError(f"text_to_image must have shape ({n_texts},), got {tuple(text_to_image.shape)}")
    scores = scores.float()
    text_to_image = text_to_image.to(scores.device)
    # Rank of the true image for each text: how many images score strictly higher.
    true_t2i = scores[text_to_image, torch.arange(n_texts, device=scores.device)]
    t2i_rank = (scores > true_t2i.unsqueeze(0)).sum(0)
    # Best rank over each image's texts: rank of a text among the image's row.
    owns = torch.zeros(n_images, n_texts, dtype=torch.bool, device=scores.device)
    owns[text_to_image, torch.arange(n_texts, device=scores.device)] = True
    best_true = scores.masked_fill(~owns, float("-inf")).max(1).values
    i2t_rank = (scores > best_true.unsqueeze(1)).sum(1)
    out = {}
    for k in ks:
        out[f"t2i_r{k}"] = (t2i_rank < k).float().mean().item()
    for k in ks:
        out[f"i2t_r{k}"] = (i2t_rank < k).float().mean().item()
    return out


def rerank_score(itc, rerank, itc_scale: float, kind: str = "itm", rerank_scale: float = 1.0):
    """A candidate pair's score once reranked: the product of the two scorers' distributions,
    each with the temperature the model learnt for it — s_itc·cos + log p_itm for ITM,
    s_itc·cos + s_filip·filip for FILIP. The one definition every room ranks by (training
    eval, search, foils). Tensors or numpy arrays.

    Why not BLIP's cos + p_itm: the ITC cosines of a query's top candidates differ by a few
    hundredths while an untrained or unsure ITM head moves p by tenths, so p alone decides;
    on the emoji val split that lowered t2i R@1 from 0.415 (ITC) to 0.383, while the
    log-linear sum gave 0.417 (tools/bench_scorers.py, docs/benchmarks.md)."""
    if kind == "itm":
        log = torch.log if torch.is_tensor(rerank) else np.log
        return itc_scale * itc + log(rerank.clip(1e-6, None) if not torch.is_tensor(rerank)
                                     else rerank.clamp(min=1e-6))
    if kind == "filip":
        return itc_scale * itc + rerank_scale * rerank
    raise ValueError(f"unknown rerank kind {kind!r}")


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Fraction of rows whose label is among the k highest logits."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hit = top == labels.unsqueeze(1)
    return {f"top{k}": hit[:, :min(k, k_max)].any(1).float().mean().item() for k in ks}

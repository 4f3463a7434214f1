"""Retrieval evaluation on the val shards: ITC, ITM rerank of the ITC top-k (ALBEF/BLIP),
FILIP late interaction, and the val loss of every objective.

Every rank evaluates the whole val set in lockstep (ZeRO-3 needs all ranks in every
forward); the results are identical, rank 0 reports them."""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterable

import torch

from vlp.caption.evaluate import CaptionSamples, caption_eval
from vlp.metrics import rerank_score, retrieval_recall
from vlp.model.scoring import itm_pair_scores

log = logging.getLogger(__name__)
METHODS = ("itc", "itm_rerank", "filip")
# Added to reranked candidates so they rank above every non-candidate (cosines <= 1):
# reranked scores s·cos + log p lie within ±(max_logit_scale + 14).
RERANK_OFFSET = 1000.0


def _to(x: torch.Tensor, device: str, dtype: torch.dtype) -> torch.Tensor:
    return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)


@torch.no_grad()
def embed_val_set(model, batches: Iterable[dict], device: str, dtype: torch.dtype,
                  rank: int, world_size: int) -> dict[str, Any]:
    """One pass: global and token embeddings, fusion image states, and val losses."""
    parts: dict[str, list] = {k: [] for k in ("img", "txt", "img_tok", "txt_tok",
                                              "states", "txt_states", "mask", "owner")}
    loss_sums: dict[str, float] = {}
    loss_rows = n_images = 0
    for batch in batches:
        images = _to(batch["image"], device, dtype)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        # Each tower runs once per batch; every score is taken from its states.
        states, text_states = model.encode_image_states(images), model.encode_text_states(ids, mask)
        parts["img"].append(model.encode_image(image_states=states).float())
        parts["txt"].append(model.encode_text(attention_mask=mask, text_states=text_states).float())
        if model.has_filip:
            parts["img_tok"].append(model.encode_image_tokens(image_states=states))
            parts["txt_tok"].append(model.encode_text_tokens(attention_mask=mask, text_states=text_states))
        if model.has_itm:
            # ITM rerank runs only the fusion layers per (text, image) pair.
            parts["states"].append(states)
            parts["txt_states"].append(text_states)
        parts["mask"].append(mask)
        parts["owner"].append(batch["text_image_index"] + n_images)
        rows = _val_loss(model, batch, images, ids, mask, rank, world_size, loss_sums)
        loss_rows += rows
        n_images += images.shape[0]
    if n_images == 0:
        raise ValueError("the val set yielded no samples (all skipped?)")
    out = {k: torch.cat(v) for k, v in parts.items() if v}
    out["loss"] = _mean_over_ranks(loss_sums, loss_rows, world_size, out["img"].device)
    return out


def _mean_over_ranks(sums: dict[str, float], rows: int, world_size: int, device) -> dict[str, float]:
    names = sorted(sums)
    totals = torch.tensor([sums[n] for n in names] + [float(rows)], dtype=torch.float64, device=device)
    if world_size > 1:
        torch.distributed.all_reduce(totals)
    count = totals[-1].item()
    return {n: totals[i].item() / count for i, n in enumerate(names)} if count else {}


def _val_loss(model, batch, images, ids, mask, rank, world_size, sums) -> int:
    """Model losses on (image, first caption) pairs. Each rank takes its own slice so the
    losses' all-gathers see every pair once; the batch is trimmed to a multiple of the world
    size because all-gathers need equal shapes. Returns the rows counted on this rank."""
    # Captions come flattened in image order, so each image's first one is a sorted search.
    first = torch.searchsorted(batch["text_image_index"], torch.arange(images.shape[0]))
    usable = images.shape[0] - images.shape[0] % world_size
    if usable == 0:
        return 0
    rows = torch.arange(rank, usable, world_size)
    out = model({"image": images[rows], "input_ids": ids[first[rows]],
                 "attention_mask": mask[first[rows]], "image_id": batch["image_id"][rows].to(ids.device),
                 "text": [batch["text"][i] for i in first[rows].tolist()],
                 "key": [batch["key"][i] for i in rows.tolist()]})
    for name, value in out.items():
        if torch.is_tensor(value) and value.numel() == 1:
            sums[name] = sums.get(name, 0.0) + float(value) * len(rows)
    return len(rows)


def itm_rerank(model, itc: torch.Tensor, emb: dict[str, Any], k: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ALBEF/BLIP: the ITC top-k candidates of every query are rescored by ITM probability
    + ITC similarity; the rest keep their ITC order below them. Returns (i2t, t2i) scores."""
    n_img, n_txt = itc.shape
    k_t, k_i = min(k, n_txt), min(k, n_img)
    # i2t: each image against its top texts; t2i: each text against its top images.
    top_txt = itc.topk(k_t, dim=1).indices                    # [n_img, k_t]
    top_img = itc.t().topk(k_i, dim=1).indices                # [n_txt, k_i]
    img_of_pair = torch.cat([torch.arange(n_img).repeat_interleave(k_t), top_img.reshape(-1)])
    txt_of_pair = torch.cat([top_txt.reshape(-1), torch.arange(n_txt).repeat_interleave(k_i)])
    scores = itm_pair_scores(model, emb["states"], emb["txt_states"], emb["mask"],
                             img_of_pair, txt_of_pair, batch_size)
    i2t, t2i = itc.clone(), itc.clone()
    rows = torch.arange(n_img).repeat_interleave(k_t)
    scale = float(model.logit_scale)
    i2t[rows, top_txt.reshape(-1)] = RERANK_OFFSET + rerank_score(
        itc[rows, top_txt.reshape(-1)], scores[:n_img * k_t], scale)
    cols = torch.arange(n_txt).repeat_interleave(k_i)
    t2i[top_img.reshape(-1), cols] = RERANK_OFFSET + rerank_score(
        itc[top_img.reshape(-1), cols], scores[n_img * k_t:], scale)
    return i2t, t2i


def _pick(i2t_scores: torch.Tensor, t2i_scores: torch.Tensor, owner: torch.Tensor) -> dict[str, float]:
    """Recall where the i2t and t2i directions use different score matrices."""
    i2t = retrieval_recall(i2t_scores, owner)
    t2i = retrieval_recall(t2i_scores, owner)
    return {**{k: v for k, v in t2i.items() if k.startswith("t2i")},
            **{k: v for k, v in i2t.items() if k.startswith("i2t")}}


@torch.no_grad()
def evaluate(model, batches: Iterable[dict], *, device: str, dtype: torch.dtype, rerank_k: int,
             batch_size: int, rank: int = 0, world_size: int = 1, zero3: bool = False,
             foils=None, caption_samples: int = 0, caption_meteor: bool = False) -> dict[str, Any]:
    """{"itc": {...}, "itm_rerank": {...}, "filip": {...}, "loss": {...}, "n_images",
    "n_texts"}; recall keys t2i_r1/5/10 and i2t_r1/5/10. `itm_rerank` / `filip` are left
    out for a model without an ITM head / FILIP heads. `foils` (vlp.foils.training_foils)
    adds the foil report as "foils". With `caption_samples` and a decoder, rank 0 adds
    "caption": vlp.caption.evaluate.caption_eval on that many val images."""
    was_training = model.training
    model.eval()
    gather = contextlib.nullcontext()
    if zero3:
        import deepspeed
        # Direct calls to encode_* skip the root module's hooks that fetch ZeRO-3 shards.
        gather = deepspeed.zero.GatheredParameters(list(model.parameters()))
    if caption_samples and zero3 and model.has_decoder:
        # Decoding on rank 0 alone would deadlock: each ZeRO-3 submodule call fetches its
        # partitioned weights with a collective the other ranks never join.
        log.warning("eval: no caption metrics under ZeRO-3 (rank 0 would decode alone); "
                    "run pipelines/caption.py --eval on the exported model")
        caption_samples = 0
    captions = CaptionSamples(caption_samples if model.has_decoder and rank == 0 else 0)
    try:
        with gather:
            emb = embed_val_set(model, captions.watch(batches), device, dtype, rank, world_size)
            owner = emb["owner"].cpu()
            itc = (emb["img"] @ emb["txt"].t()).cpu()
            results = {"itc": retrieval_recall(itc, owner)}
            # A model trained without an objective has no head to score with; its block is absent.
            if model.has_itm:
                results["itm_rerank"] = _pick(*itm_rerank(model, itc, emb, rerank_k, batch_size), owner)
            if model.has_filip:
                results["filip"] = _pick(*_filip_matrix(model, emb, batch_size), owner)
            if foils is not None:
                results["foils"] = foils(model, device, dtype)
            if len(captions):
                results["caption"] = caption_eval(model, captions, batch_size, device, dtype, caption_meteor)
    finally:
        model.train(was_training)
    results["loss"] = emb["loss"]
    results["n_images"], results["n_texts"] = itc.shape
    return results


def _filip_matrix(model, emb: dict[str, Any], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    i2t, t2i = [], []
    for start in range(0, emb["img_tok"].shape[0], batch_size):
        a, b = model.filip_scores(emb["img_tok"][start:start + batch_size], emb["txt_tok"], emb["mask"])
        i2t.append(a.float().cpu())
        t2i.append(b.float().cpu())
    return torch.cat(i2t), torch.cat(t2i)


def format_table(results: dict[str, Any]) -> str:
    """The eval table printed at the end of a run."""
    keys = ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10")
    lines = [f"{'method':<11}" + "".join(f"{k:>9}" for k in keys)]
    for method in (m for m in METHODS if m in results):
        lines.append(f"{method:<11}" + "".join(f"{results[method][k]:>9.3f}" for k in keys))
    lines.append(f"({results['n_images']} images, {results['n_texts']} captions)")
    if "foils" in results:
        from vlp.foils.report import one_line
        lines.append(one_line(results["foils"]))
    if "caption" in results:
        caption = results["caption"]
        for method in ("greedy", "beam"):
            scores = caption[method]
            lines.append(f"caption {method:<6} BLEU-4 {scores['bleu4']:.3f}  CIDEr-D {scores['cider']:.3f}  "
                         f"ROUGE-L {scores['rougeL']:.3f}"
                         + (f"  METEOR {scores['meteor']:.3f}" if "meteor" in scores else ""))
        lines.append(f"({caption['n_images']} images, {caption['tokenizer']} tokenizer)")
    return "\n".join(lines)

"""How the model's scorers and their combinations rank a held-out set: ITC, FILIP (each
direction's own matrix), ITM reranking the ITC top-k, and sums of the scorers, each with
its raw and its temperature-scaled form. Everything is computed from one pass of the
towers, so comparing combinations costs seconds; a combination to adopt must win on more
than one data set and be chosen without looking at the set it is reported on.

    python tools/bench_scorers.py --model runs/demo/model --shards 'shards/demo/val-{000000..000001}.tar'
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from vlp.data import eval_loader
from vlp.metrics import retrieval_recall
from vlp.model import load_model_dir
from vlp.padding import trim_padding
from vlp.train.evaluate import embed_val_set


def candidates(itc: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, text) index pairs of every text's ITC top-k images and every image's top-k texts."""
    n_img, n_txt = itc.shape
    top_img = itc.t().topk(min(k, n_img), dim=1).indices
    top_txt = itc.topk(min(k, n_txt), dim=1).indices
    images = torch.cat([top_img.reshape(-1), torch.arange(n_img).repeat_interleave(top_txt.shape[1])])
    texts = torch.cat([torch.arange(n_txt).repeat_interleave(top_img.shape[1]), top_txt.reshape(-1)])
    return images, texts


def rerank(base: torch.Tensor, images: torch.Tensor, texts: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`base` with the candidate pairs lifted above all others and ordered by `values`."""
    out = base.clone()
    out[images, texts] = 1e4 + values
    return out


def score_variants(model, emb: dict, k: int, batch_size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (i2t scores, t2i scores), both [n_images, n_texts]."""
    cos = (emb["img"] @ emb["txt"].t()).cpu()
    s_itc = float(model.logit_scale)
    out = {"itc": (cos, cos)}
    if model.has_filip:
        i2t, t2i = [], []
        for start in range(0, emb["img_tok"].shape[0], batch_size):
            a, b = model.filip_scores(emb["img_tok"][start:start + batch_size], emb["txt_tok"], emb["mask"])
            i2t.append(a.float().cpu())
            t2i.append(b.float().cpu())
        i2t, t2i = torch.cat(i2t), torch.cat(t2i)
        s_filip = float(model.filip_logit_scale)
        out["filip"] = (i2t, t2i)
        out["filip i2t matrix both ways"] = (i2t, i2t)
        out["filip t2i matrix both ways"] = (t2i, t2i)
        out["cos + filip"] = (cos + i2t, cos + t2i)
        out["s·cos + s·filip"] = (s_itc * cos + s_filip * i2t, s_itc * cos + s_filip * t2i)
    if model.has_itm:
        images, texts = candidates(cos, k)
        states, mask = emb["states"], emb["mask"]
        probs = torch.empty(len(images))
        for start in range(0, len(images), batch_size):
            i, t = images[start:start + batch_size], texts[start:start + batch_size]
            text_states, text_mask = trim_padding(emb["txt_states"][t], mask[t])
            probs[start:start + batch_size] = model.itm_scores(
                attention_mask=text_mask, image_states=states[i], text_states=text_states).float().cpu()
        base = cos[images, texts]
        log_p = probs.clamp(min=1e-6).log()
        for name, values in {"itm alone (ALBEF)": probs, "cos + p_itm (BLIP)": base + probs,
                             "s·cos + log p_itm": s_itc * base + log_p}.items():
            scores = rerank(cos, images, texts, values)
            out[name] = (scores, scores)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--shards", required=True, help="held-out shards (img2dataset layout)")
    parser.add_argument("--k", type=int, default=16, help="ITM reranks each query's ITC top-k")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    model, cfg, tokenizer = load_model_dir(args.model)
    cfg.data.workers = 0
    batches = eval_loader(cfg.data, tokenizer, spec=args.shards, rank=0, world_size=1)
    with torch.no_grad():
        emb = embed_val_set(model, batches, "cpu", torch.float32, 0, 1)
        variants = score_variants(model, emb, args.k, args.batch_size)
    owner = emb["owner"].cpu()
    rows = {}
    print(f"{'scorer':<30}{'t2i_r1':>8}{'t2i_r10':>8}{'i2t_r1':>8}{'i2t_r10':>8}")
    for name, (i2t, t2i) in variants.items():
        t2i_recall, i2t_recall = retrieval_recall(t2i, owner), retrieval_recall(i2t, owner)
        rows[name] = {k: v for k, v in t2i_recall.items() if k.startswith("t2i")}
        rows[name].update({k: v for k, v in i2t_recall.items() if k.startswith("i2t")})
        r = rows[name]
        print(f"{name:<30}{r['t2i_r1']:>8.3f}{r['t2i_r10']:>8.3f}{r['i2t_r1']:>8.3f}{r['i2t_r10']:>8.3f}")
    print(json.dumps({"n_images": len(emb["img"]), "n_texts": len(owner), "scorers": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""ITM probe: is a trained model's ITM held back by its fusion layers or by its training?

Freezes the towers of a trained model, gives its fusion layers a fresh cross-attention and
a fresh ITM head (`--init fresh`; `--init model` continues from the model's own), and
trains ITM alone — the training objective itself, vlp.losses.matching.ITM — on tower
states cached once from the training shards (no augmentation), so a step costs only the
fusion layers. Before and after, on the val split: t2i R@1 of ITC, of ITM alone among
ITC's top k, and of the rerank (s·cos + log p); with --foils, each scorer's foil accuracy.

If the probe's rerank beats ITC where the model's own ITM did not, the fusion layers can
use what the towers give them and the model's ITM lacked training (steps, negatives); if
the probe also fails, the towers' features or the fusion architecture are the limit.

    python tools/probe_itm.py --model runs/demo/model --steps 200 --out runs/probe-demo
    python tools/probe_itm.py --model runs/relations/model --text-negatives 0.5 \\
        --foils /work/devdata/relations/foils.jsonl --foils-images /work/devdata/relations \\
        --train '/work/devdata/relations/train-{000000..000003}.tar' \\
        --val '/work/devdata/relations/val-{000000..000001}.tar' --out runs/probe-relations
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from vlp.atomic import atomic_write_json
from vlp.data import eval_loader
from vlp.data.perturb import negatives_for_batch
from vlp.data.text import tokenize
from vlp.foils.formats import read_foils
from vlp.foils.run import evaluate_foils
from vlp.losses.matching import ITM, ITMOptions
from vlp.metrics import rerank_score, retrieval_recall
from vlp.model import load_model_dir
from vlp.model.scoring import itm_pair_scores
from vlp.model.text import init_like_bert
from vlp.padding import trim_padding


@torch.no_grad()
def cache_split(model, cfg, tokenizer, spec: str) -> dict:
    """Tower outputs of every (image, caption) of `spec`: image states and embeddings per
    image, text states, masks, embeddings, raw text and owning image per caption."""
    parts: dict[str, list] = {k: [] for k in ("states", "img", "txt_states", "mask", "txt", "owner", "text")}
    n_images = 0
    for batch in tqdm(eval_loader(cfg.data, tokenizer, spec=spec), desc=f"caching {spec}", unit="batch"):
        states = model.encode_image_states(batch["image"])
        text_states = model.encode_text_states(batch["input_ids"], batch["attention_mask"])
        parts["states"].append(states)
        parts["img"].append(model.encode_image(image_states=states))
        parts["txt_states"].append(text_states)
        parts["mask"].append(batch["attention_mask"])
        parts["txt"].append(model.encode_text(attention_mask=batch["attention_mask"], text_states=text_states))
        parts["owner"].append(torch.as_tensor(batch["text_image_index"]) + n_images)
        parts["text"].append(batch["text"])
        n_images += states.shape[0]
    out = {k: torch.cat(v) for k, v in parts.items() if k != "text"}
    out["text"] = [t for texts in parts["text"] for t in texts]
    return out


@dataclass
class CachedFeatures:
    """What vlp.losses.matching.ITM reads of `vlp.model.features.Features`, from the cache."""
    model: nn.Module
    image_states: torch.Tensor
    text_states: torch.Tensor
    attention_mask: torch.Tensor
    image_emb: torch.Tensor
    text_emb: torch.Tensor
    image_id: torch.Tensor
    negatives: tuple | None = None
    negative_text_states: torch.Tensor | None = None

    @property
    def negative_owner(self):
        return self.negatives[0]

    @property
    def negative_mask(self):
        return self.negatives[2]


def batch_features(model, cache: dict, rows: torch.Tensor, negative_fraction: float, seed: str) -> CachedFeatures:
    owner = cache["owner"][rows]
    states, mask = trim_padding(cache["txt_states"][rows], cache["mask"][rows])
    features = CachedFeatures(model, cache["states"][owner], states, mask, cache["img"][owner],
                              cache["txt"][rows], owner)
    if negative_fraction > 0:
        texts = [cache["text"][i] for i in rows.tolist()]
        owners, negatives = negatives_for_batch(texts, negative_fraction, tuple(model.negatives_cfg.kinds), seed)
        if negatives:
            tokens = tokenize(model.tokenizer, negatives, model.max_len)
            ids, neg_mask = trim_padding(tokens["input_ids"], tokens["attention_mask"])
            features.negatives = (torch.tensor(owners), ids, neg_mask)
            with torch.no_grad():
                features.negative_text_states = model.encode_text_states(ids, neg_mask)
    return features


def reset_fusion(model, seed: int) -> None:
    """Every fusion layer's cross-attention re-initialized as a new one is, and a fresh ITM
    head, seeded. In place: a decoder sharing the cross-attention keeps sharing it."""
    torch.manual_seed(seed)
    for layer in model.text.fusion:
        init_like_bert(layer.crossattention, model.text.config.initializer_range)
    model.itm_head.reset_parameters()


def train_probe(model, cache: dict, args) -> list[float]:
    """ITM alone on the cached states: only the fusion layers and the ITM head learn."""
    for param in model.parameters():
        param.requires_grad_(False)
    trainable = [*model.text.fusion.parameters(), *model.itm_head.parameters()]
    for param in trainable:
        param.requires_grad_(True)
    itm = ITM(ITMOptions(hard_negatives_warmup=args.hard_negatives_warmup), None)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.05, betas=(0.9, 0.98))
    generator = torch.Generator().manual_seed(args.seed)
    model.text.fusion.train()  # dropout in the probed layers only; the towers stay in eval
    losses: list[float] = []
    bar = tqdm(total=args.steps, desc="probe", unit="step")
    while len(losses) < args.steps:
        order = torch.randperm(len(cache["owner"]), generator=generator)
        for start in range(0, len(order) - args.batch + 1, args.batch):
            step = len(losses)
            if step >= args.steps:
                break
            itm.set_progress(step, step / args.steps)
            features = batch_features(model, cache, order[start:start + args.batch],
                                      args.text_negatives, seed=f"probe/{step}")
            loss = itm(features)["loss"]
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    model.eval()
    return losses


@torch.no_grad()
def measure(model, tokenizer, cfg, val: dict, args) -> dict:
    """t2i R@1 on the val split by ITC, ITM alone among ITC's top k, and the rerank."""
    itc = val["img"] @ val["txt"].t()                                  # [n_img, n_txt]
    top = itc.t().topk(min(args.k, itc.shape[0]), dim=1).indices        # [n_txt, k]
    texts = torch.arange(itc.shape[1]).repeat_interleave(top.shape[1])
    p_match = itm_pair_scores(model, val["states"], val["txt_states"], val["mask"],
                              top.reshape(-1), texts, batch_size=256).view_as(top)
    candidate_cos = itc.t().gather(1, top)

    def recall_at_1(candidate_scores: torch.Tensor) -> float:
        """Candidates ranked by their scores, above every other image."""
        scores = itc.t().clone().fill_(-1e9).scatter(1, top, candidate_scores).t()
        return retrieval_recall(scores, val["owner"])["t2i_r1"]

    out = {"itc": retrieval_recall(itc, val["owner"])["t2i_r1"],
           "itm_only": recall_at_1(p_match),
           "rerank": recall_at_1(rerank_score(candidate_cos, p_match, float(model.logit_scale)))}
    if args.foils:
        report = evaluate_foils(model, tokenizer, read_foils(args.foils, args.foils_images), cfg.data)
        scorers = ("chance", "itc", "itm", "rerank")
        out["foils"] = {s: report[s] for s in scorers if s in report}
        out["foils"]["by_type"] = {kind: {s: row[s] for s in ("n", *scorers) if s in row}
                                   for kind, row in report.get("by_type", {}).items()}
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained model directory with fusion layers")
    parser.add_argument("--train", help="training shards (default: the model's data.train)")
    parser.add_argument("--val", help="val shards (default: the model's data.val)")
    parser.add_argument("--init", choices=("fresh", "model"), default="fresh",
                        help="fresh cross-attention + ITM head, or continue the model's own")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--hard-negatives-warmup", type=int, default=0,
                        help="steps from uniform to ITC-hard negatives (0: hard from the start)")
    parser.add_argument("--text-negatives", type=float, default=0.0,
                        help="fraction of captions with a composition-aware negative (loss.text_negatives)")
    parser.add_argument("--k", type=int, default=16, help="ITC candidates the ITM reranks")
    parser.add_argument("--foils", help="a foil test (jsonl) scored before and after")
    parser.add_argument("--foils-images", help="root of the foil test's relative image paths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="directory for probe.json")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    model, cfg, tokenizer = load_model_dir(args.model)
    if not model.has_itm:
        sys.exit(f"probe_itm: {args.model} has no ITM head (trained with loss.itm: 0)")
    started = time.perf_counter()
    train = cache_split(model, cfg, tokenizer, args.train or cfg.data.train)
    val = cache_split(model, cfg, tokenizer, args.val or cfg.data.val)
    result = {"model": str(args.model), "args": vars(args), "before": measure(model, tokenizer, cfg, val, args)}
    if args.init == "fresh":
        reset_fusion(model, args.seed)
    losses = train_probe(model, train, args)
    result["after"] = measure(model, tokenizer, cfg, val, args)
    result["loss_every_10"] = [round(sum(losses[i:i + 10]) / len(losses[i:i + 10]), 4)
                               for i in range(0, len(losses), 10)]
    result["seconds"] = round(time.perf_counter() - started, 1)
    for when in ("before", "after"):
        print(f"{when:>6}: " + "  ".join(f"{k} {v:.3f}" for k, v in result[when].items() if k != "foils")
              + ("  foils " + json.dumps(result[when]["foils"]) if "foils" in result[when] else ""))
    if args.out:
        atomic_write_json(Path(args.out) / "probe.json", result)
    print(json.dumps({"before": result["before"], "after": result["after"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CoOp few-shot prompt tuning (Zhou et al., 2022): learn M context vectors that replace the
words of a hand-written template, on N labelled shots per class, both towers frozen.

The prompt for class c is `[CLS] v_1 .. v_M <tokens of c> [SEP]`, fed to the text tower as
word embeddings through `model.encode_text(..., inputs_embeds=...)`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from vlp.atomic import atomic_write
from vlp.data.images import eval_transform
from vlp.zeroshot import report
from vlp.zeroshot.classes import ClassList
from vlp.zeroshot.classifier import TextEncoder, ZeroShotClassifier
from vlp.zeroshot.errors import ZeroShotError
from vlp.zeroshot.sources import source_batches
from vlp.zeroshot.templates import LearnedPrompt

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- prompts

def class_token_embeddings(model, encoder: TextEncoder, names: list[str], n_ctx: int):
    """Word embeddings of `[CLS] <name> [SEP]` with n_ctx free slots after [CLS]:
    returns (embeds [C, L, W] with zeros in the slots, mask [C, L])."""
    ids, mask = encoder.tokenize(names)
    length = int(mask.sum(1).max()) + n_ctx
    if length > encoder.max_len:
        raise ZeroShotError(f"{n_ctx} context vectors + the longest class name need {length} "
                            f"tokens, more than the model's max_len {encoder.max_len}")
    ids, mask = ids[:, :length - n_ctx], mask[:, :length - n_ctx]
    with torch.no_grad():
        words = model.embed_words(ids)
    slots = words.new_zeros(len(names), n_ctx, words.shape[-1])
    embeds = torch.cat([words[:, :1], slots, words[:, 1:]], 1)
    mask = torch.cat([mask[:, :1], torch.ones(len(names), n_ctx, dtype=mask.dtype), mask[:, 1:]], 1)
    return embeds, mask


def encode_prompts(model, ctx: torch.Tensor, class_embeds: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """[C, D] normalized class embeddings for context `ctx` [M, W] (differentiable in ctx)."""
    n_ctx = ctx.shape[0]
    embeds = torch.cat([class_embeds[:, :1], ctx.unsqueeze(0).expand(len(class_embeds), -1, -1),
                        class_embeds[:, 1 + n_ctx:]], 1)
    return model.encode_text(attention_mask=mask, inputs_embeds=embeds)


def init_context(model, encoder: TextEncoder, n_ctx: int, seed: int) -> torch.Tensor:
    """Start from the words of "a photo of a" when M = 4 (CoOp's best init), else N(0, 0.02)."""
    if n_ctx == 4:
        ids, mask = encoder.tokenize(["a photo of a"])
        words = ids[0, 1:1 + n_ctx]
        with torch.no_grad():
            return model.embed_words(words).clone()
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n_ctx, model.text.width, generator=generator) * 0.02


def save_context(path: Path, ctx: torch.Tensor, meta: dict) -> None:
    atomic_write(path, lambda tmp: save_file({"ctx": ctx.detach().float().contiguous()}, str(tmp),
                                             metadata={k: json.dumps(v) for k, v in meta.items()}))


def load_context(path: Path, model) -> tuple[torch.Tensor, dict]:
    try:
        with safe_open(str(path), framework="pt") as f:
            ctx = f.get_tensor("ctx")
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    except Exception as err:
        raise ZeroShotError(f"{path}: not a learned prompt file ({err})") from None
    if ctx.dim() != 2 or ctx.shape[1] != model.text.width:
        raise ZeroShotError(f"{path}: context vectors {tuple(ctx.shape)} do not fit this model's "
                            f"text width {model.text.width}")
    return ctx, meta


def learned_class_embeddings(model, encoder: TextEncoder, names: list[str], path: Path,
                             fingerprint: str | None = None) -> torch.Tensor:
    ctx, meta = load_context(path, model)
    if fingerprint and meta.get("model_fingerprint") not in (None, fingerprint):
        log.warning("%s was learned on a different model; its accuracy may not carry over", path)
    embeds, mask = class_token_embeddings(model, encoder, names, ctx.shape[0])
    with torch.no_grad():
        return encode_prompts(model, ctx, embeds, mask)


# --------------------------------------------------------------------------- tuning

def tune_context(model, encoder: TextEncoder, names: list[str], features: torch.Tensor,
                 targets: torch.Tensor, n_ctx: int = 4, steps: int = 300, lr: float = 2e-3,
                 seed: int = 0) -> tuple[torch.Tensor, list[float]]:
    """Learn ctx on precomputed (frozen) image features; returns (ctx, loss per step). The
    model's own parameters are frozen meanwhile and given back as they were."""
    with frozen(model):
        return _tune(model, encoder, names, features, targets, n_ctx, steps, lr, seed)


@contextlib.contextmanager
def frozen(model):
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def _tune(model, encoder: TextEncoder, names: list[str], features: torch.Tensor, targets: torch.Tensor,
          n_ctx: int, steps: int, lr: float, seed: int) -> tuple[torch.Tensor, list[float]]:
    ctx = torch.nn.Parameter(init_context(model, encoder, n_ctx, seed))
    embeds, mask = class_token_embeddings(model, encoder, names, n_ctx)
    optimizer = torch.optim.AdamW([ctx], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    scale = float(model.logit_scale)
    losses = []
    for _ in range(steps):
        class_emb = encode_prompts(model, ctx, embeds, mask)
        loss = F.cross_entropy(scale * features @ class_emb.T, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    return ctx.detach(), losses


def split_shots(labels: list[int], shots: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices of `shots` random images per class for training, the rest for evaluation."""
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        by_class.setdefault(c, []).append(i)
    rng = random.Random(seed)
    train, held_out = [], []
    for c in sorted(by_class):
        items = by_class[c][:]
        rng.shuffle(items)
        train += items[:shots]
        held_out += items[shots:]
    return sorted(train), sorted(held_out)


def default_prompt_path(model_dir: str, classes: ClassList, n_ctx: int, shots: int) -> Path:
    digest = hashlib.sha256("\n".join(classes.names).encode()).hexdigest()[:8]
    return Path(model_dir) / "prompts" / f"coop-m{n_ctx}-n{shots}-{digest}.safetensors"


def tune_and_compare(opts, model, cfg, encoder: TextEncoder, classes: ClassList, templates,
                     source, cache) -> dict:
    """--tune-prompts N: shots -> context vectors; learned vs hand-written on the held-out rest."""
    _check_tuning_inputs(opts, templates, source)
    shots = LabelledImages.read(source, cfg, classes, opts.tune_prompts, opts.seed)
    start = time.perf_counter()
    with torch.no_grad():
        features = torch.cat([model.encode_image(chunk).float() for chunk in shots.images.split(256)])
    seconds = time.perf_counter() - start
    baseline = ZeroShotClassifier(model, encoder, classes.names, templates, "itc", cache=cache)
    ctx, losses = tune_context(model, encoder, classes.names, features[shots.train],
                               shots.targets(shots.train), opts.n_ctx, opts.tune_steps, opts.tune_lr,
                               opts.seed)
    prompt_path = Path(opts.prompt_out) if opts.prompt_out else default_prompt_path(
        opts.model, classes, opts.n_ctx, opts.tune_prompts)
    save_context(prompt_path, ctx, {"n_ctx": opts.n_ctx, "shots": opts.tune_prompts,
                                    "classes": classes.names, "final_loss": losses[-1],
                                    "model_fingerprint": cache.model_fingerprint})
    log.info("learned prompt saved to %s (use --templates learned:%s)", prompt_path, prompt_path)
    with torch.no_grad():
        learned = encode_prompts(model, ctx, *class_token_embeddings(model, encoder, classes.names,
                                                                     opts.n_ctx))
    scale, test = float(model.logit_scale), shots.test
    test_labels = [shots.labels[i] for i in test]
    hand = report.classification_metrics(
        (scale * features[test] @ baseline.class_embeddings.T).softmax(-1), test_labels, classes)
    preds = report.Predictions()
    preds.add([shots.keys[i] for i in test], test_labels, (scale * features[test] @ learned.T).softmax(-1),
              report.thumbnails(shots.images[test], cfg.data.mean, cfg.data.std), classes.index())
    extra = {"coop": {"shots_per_class": opts.tune_prompts, "n_ctx": opts.n_ctx,
                      "steps": opts.tune_steps, "lr": opts.tune_lr, "n_train": len(shots.train),
                      "loss_first": losses[0] if losses else None,
                      "loss_last": losses[-1] if losses else None,
                      "prompt_file": str(prompt_path)},
             "hand_written": {k: hand[k] for k in ("top1", "top5", "mean_per_class", "n")},
             "templates": f"learned:{prompt_path}", "hand_written_templates": opts.templates}
    metrics = report.finish_report(Path(opts.out), preds, classes, source, seconds, opts, extra)
    log.info("held-out top-1: learned %.3f vs hand-written (%s) %.3f",
             metrics["top1"], opts.templates, hand["top1"])
    return metrics


def _check_tuning_inputs(opts, templates, source) -> None:
    if isinstance(templates, LearnedPrompt):
        raise ZeroShotError("--tune-prompts compares against hand-written --templates, not learned:")
    if opts.scoring != "itc":
        raise ZeroShotError("--tune-prompts works with --scoring itc")
    if not source.labelled:
        raise ZeroShotError("--tune-prompts needs labelled images (an ImageFolder tree or "
                            "shards with --label-field)")


@dataclass
class LabelledImages:
    """Every image of a labelled source with a known label, split into the tuning shots
    (`train`: row indices) and the held-out rest (`test`)."""
    keys: list[str]
    labels: list[str]
    images: torch.Tensor
    index: dict[str, int]
    train: list[int]
    test: list[int]

    @classmethod
    def read(cls, source, cfg, classes: ClassList, shots: int, seed: int) -> "LabelledImages":
        keys, labels, images = [], [], []
        for batch_keys, batch_labels, batch_images in source_batches(source, eval_transform(cfg.data), 256):
            keys += batch_keys
            labels += batch_labels
            images.append(batch_images)
        images = torch.cat(images) if images else torch.empty(0)
        index = classes.index()
        unknown = sorted({label for label in labels if label not in index})
        if unknown:
            log.warning("labels not in the class list (not used): %s", unknown[:20])
        known = [i for i, label in enumerate(labels) if label in index]
        train_rows, test_rows = split_shots([index[labels[i]] for i in known], shots, seed)
        test = [known[i] for i in test_rows]
        if not test:
            raise ZeroShotError(f"no images left for evaluation after taking {shots} "
                                f"shots per class from {len(known)} labelled images")
        return cls(keys, labels, images, index, [known[i] for i in train_rows], test)

    def targets(self, rows: list[int]) -> torch.Tensor:
        return torch.tensor([self.index[self.labels[i]] for i in rows])

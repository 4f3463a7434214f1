"""One zero-shot run: load everything, classify the images in batches, write the report."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tqdm import tqdm

from vlp.model.io import WEIGHT_FILES
from vlp.zeroshot import report
from vlp.zeroshot.classes import ClassList, load_classes, reject_indistinct
from vlp.zeroshot.classifier import EmbeddingCache, TextEncoder, ZeroShotClassifier
from vlp.zeroshot.coop import learned_class_embeddings, tune_and_compare
from vlp.zeroshot.errors import ZeroShotError
from vlp.zeroshot.sources import ImageSource, open_source, source_batches
from vlp.zeroshot.templates import LearnedPrompt, load_templates

log = logging.getLogger(__name__)



@dataclass
class ZeroShotOptions:
    model: str
    images: list[str]
    classes: str
    templates: str = "simple"
    out: str = "runs/zeroshot"
    label_field: str | None = None
    scoring: str = "itc"
    itm_k: int = 5
    batch_size: int = 64
    cache_dir: str | None = None  # default: <out>/cache
    progress: bool = True
    # CoOp few-shot prompt tuning (0 = off); see vlp.zeroshot.coop.
    tune_prompts: int = 0
    n_ctx: int = 4
    tune_steps: int = 300
    tune_lr: float = 2e-3
    prompt_out: str | None = None
    seed: int = 0


def load_model(model_dir: str):
    """(model, cfg, tokenizer) in eval mode; a missing directory or file is named."""
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise ZeroShotError(f"model directory not found: {path}")
    for name in WEIGHT_FILES:
        if not (path / name).is_file():
            raise ZeroShotError(f"model directory {path} is incomplete: missing {name}")
    from vlp.model import load_model_dir
    model, cfg, tokenizer = load_model_dir(path)
    return model.eval(), cfg, tokenizer


def run(opts: ZeroShotOptions) -> dict:
    classes = load_classes(opts.classes)
    templates = load_templates(opts.templates)
    out = Path(opts.out)
    model, cfg, tokenizer = load_model(opts.model)
    reject_indistinct(classes, lambda name: tuple(tokenizer(name, add_special_tokens=False)["input_ids"]),
                      opts.classes)
    source = open_source(opts.images, opts.label_field)
    source.min_side, source.max_pixels = cfg.data.image_size, cfg.data.max_image_pixels
    encoder = TextEncoder(model, tokenizer, cfg.data.max_len, progress=opts.progress)
    from vlp.model import model_dir_fingerprint  # loaded with the model above
    cache = EmbeddingCache(Path(opts.cache_dir) if opts.cache_dir else out / "cache",
                           model_dir_fingerprint(opts.model))
    if opts.tune_prompts:
        return tune_and_compare(opts, model, cfg, encoder, classes, templates, source, cache)
    classifier = build_classifier(model, encoder, classes, templates, opts, cache)
    from vlp.data.images import eval_transform
    preds, seconds = classify(classifier, source, eval_transform(cfg.data), classes, cfg,
                              opts.batch_size, opts.progress)
    metrics = report.finish_report(out, preds, classes, source, seconds, opts)
    if source.kind == "single" and preds.keys:
        print_top5(preds, classes)
    return metrics


def build_classifier(model, encoder, classes: ClassList, templates, opts, cache):
    if isinstance(templates, LearnedPrompt):
        embeddings = learned_class_embeddings(model, encoder, classes.names, templates.path,
                                              cache.model_fingerprint)
        return ZeroShotClassifier(model, encoder, classes.names, None, opts.scoring,
                                  class_embeddings=embeddings)
    return ZeroShotClassifier(model, encoder, classes.names, templates, opts.scoring,
                              itm_k=opts.itm_k, cache=cache)


def classify(classifier: ZeroShotClassifier, source: ImageSource, transform,
             classes: ClassList, cfg, batch_size: int, progress: bool = True):
    preds = report.Predictions()
    index = classes.index()
    bar = tqdm(total=source.expected_count(), unit="img", desc=f"zero-shot ({classifier.scoring})",
               disable=not progress)
    start = time.perf_counter()
    for keys, labels, images in source_batches(source, transform, batch_size):
        probs = classifier.probabilities(images)
        thumbs = report.thumbnails(images, cfg.data.mean, cfg.data.std) if source.labelled else None
        preds.add(keys, labels, probs, thumbs, index)
        bar.update(len(keys))
    bar.close()
    seconds = time.perf_counter() - start
    return preds, seconds


def print_top5(preds: report.Predictions, classes: ClassList) -> None:
    probs = preds.matrix(len(classes))[0]
    top_p, top_i = probs.topk(min(5, len(classes)))
    print(preds.keys[0])
    for p, i in zip(top_p.tolist(), top_i.tolist()):
        print(f"  {p:6.1%}  {classes.names[i]}")

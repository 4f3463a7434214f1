"""Captioning a set of evaluation images and scoring the captions against their references.

Used by the training evaluation (`eval.json`'s `caption` block) and `pipelines/caption.py
--eval`. Images come from eval-loader batches: each image's references are all of its
captions (the .txt and the json `captions`).
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch

from vlp.caption.metrics import score_runs

# The decoding settings the evaluation reports (BLIP evaluates with beam search, 3 beams).
METHODS = {"greedy": {"method": "greedy"}, "beam": {"method": "beam", "num_beams": 3}}


class CaptionSamples:
    """The first `limit` images of eval batches with their references and keys, taken as
    the batches pass through `watch` (the retrieval evaluation reads the same pass)."""

    def __init__(self, limit: int):
        self.limit = max(limit, 0)
        self.images: list[torch.Tensor] = []
        self.references: list[list[str]] = []
        self.keys: list[str] = []

    def watch(self, batches: Iterable[dict]) -> Iterator[dict]:
        for batch in batches:
            self.take(batch)
            yield batch

    def take(self, batch: dict) -> None:
        n = min(self.limit - len(self.keys), len(batch["key"]))
        if n <= 0:
            return
        # A copy: the batch's images may live in a loader slot that is reused.
        self.images.append(batch["image"][:n].clone())
        self.references += references_of(batch)[:n]
        self.keys += batch["key"][:n]

    def __len__(self) -> int:
        return len(self.keys)


# BERT's tokenizer splits off every punctuation character, so decoding puts spaces around
# them: "medium - light", "man ' s", "3. 5", "( yes )". The words the captions were written
# with had none; scoring "medium - light" against "medium-light" would count a miss.
_DETOKENIZE = [(re.compile(r"(?<=\w) ([-'\u2019/]) (?=\w)"), r"\1"), (re.compile(r"(?<=\d)\. (?=\d)"), "."),
               (re.compile(r" ([:;])"), r"\1"), (re.compile(r"([(\[]) "), r"\1"), (re.compile(r" ([)\]])"), r"\1")]


def detokenize(text: str) -> str:
    """Undo the spaces BERT decoding puts around in-word punctuation (see above)."""
    for pattern, replacement in _DETOKENIZE:
        text = pattern.sub(replacement, text)
    return text.strip()


def references_of(batch: dict) -> list[list[str]]:
    """Each image's captions in an eval batch (they come flattened, with their image's index)."""
    references: list[list[str]] = [[] for _ in batch["key"]]
    for text, owner in zip(batch["text"], batch["text_image_index"].tolist()):
        references[owner].append(text)
    return references


def generate_captions(model, images: torch.Tensor, options: dict, batch_size: int,
                      device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> list[str]:
    """Captions of `images` (uint8 or normalized float), `batch_size` at a time."""
    captions = []
    for chunk in images.split(batch_size):
        chunk = chunk.to(device)
        if dtype is not None and chunk.is_floating_point():
            chunk = chunk.to(dtype)
        captions += model.generate(chunk, **options)
    return [detokenize(c) for c in captions]


def caption_eval(model, samples: CaptionSamples, batch_size: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, meteor: bool = True,
                 methods: dict[str, dict] = METHODS) -> dict:
    """{"n_images", "tokenizer", and per decoding method its metrics (bleu1..4, rougeL,
    cider[, meteor]) and one example caption} for the collected samples."""
    if not len(samples):
        raise ValueError("no images to caption")
    images = torch.cat(samples.images)
    runs = {name: generate_captions(model, images, options, batch_size, device, dtype)
            for name, options in methods.items()}
    ids = [str(i) for i in range(len(samples))]
    references = dict(zip(ids, samples.references))
    scores = score_runs({name: dict(zip(ids, captions)) for name, captions in runs.items()},
                        references, meteor=meteor)
    out: dict = {"n_images": len(samples)}
    for name, metrics in scores.items():
        out["tokenizer"] = metrics.pop("tokenizer")
        metrics.pop("n")
        out[name] = {**metrics, "example": {"key": samples.keys[0], "caption": runs[name][0],
                                            "references": samples.references[0]}}
    return out

"""The embedding pass: shards → chunks of image/caption embeddings, tokens and metadata.

Streams each shard once. Work is split by shard (`shards[rank::world]`), so processes or
ranks write disjoint chunks; a restarted pass skips every chunk whose parquet exists.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from vlp.atomic import atomic_write_json
from vlp.data.images import ImageTooLarge
from vlp.data.skips import SkipCounter
from vlp.data.sources import known_sample_count
from vlp.retrieval import store
from vlp.retrieval.encoder import Encoder
from vlp.retrieval.shards import RawSample, iter_shard

log = logging.getLogger(__name__)
BUILD_FILE = "build.json"


@dataclass
class EmbedSettings:
    model: str
    batch_size: int = 64
    chunk_size: int = 10_000
    fp16: bool = True
    # FILIP tokens kept per image: 0 stores none, -1 stores all.
    filip_tokens: int = 16
    # Caption embeddings: needed for --eval and to tune on real text queries.
    captions: bool = True
    # Set by embed_shards: the model's content (weights + config) and the shards embedded.
    model_hash: str = ""
    shards: list[str] = field(default_factory=list)

    def check_against(self, index_dir: Path, append: bool = False) -> None:
        """A resumed or merged build must use the model, the shards and the settings its
        chunks were made with; `append` lets the shard list grow. A directory that is not
        empty and holds no build is never written into."""
        path = Path(index_dir) / BUILD_FILE
        if not path.is_file():
            refuse_foreign(index_dir)
            atomic_write_json(path, asdict(self))
            return
        before = json.loads(path.read_text())
        ignored = {"batch_size", "model"} | ({"shards"} if append else set())
        changed = {k: (before.get(k), v) for k, v in asdict(self).items() if k not in ignored and before.get(k) != v}
        if changed:
            raise ValueError(f"{index_dir} holds chunks built {_explain_change(changed)}; "
                             f"use a new --out or the original model, shards and settings")
        if append or before.get("model") != self.model:
            now = asdict(self)
            now["shards"] = list(dict.fromkeys(before.get("shards", []) + self.shards))
            atomic_write_json(path, now)


def refuse_foreign(index_dir: Path) -> None:
    """An index build cleans and overwrites files in its directory: it must own it."""
    index_dir = Path(index_dir)
    if index_dir.exists() and not index_dir.is_dir():
        raise ValueError(f"{index_dir} is a file, not an index directory")
    # Atomic writes of another rank starting in the same directory leave hidden temp files.
    present = [p.name for p in index_dir.iterdir() if not p.name.startswith(".")] if index_dir.is_dir() else []
    if present and not (index_dir / BUILD_FILE).is_file():
        raise ValueError(f"{index_dir} is not empty ({', '.join(sorted(present)[:5])}) and is not a vlp index "
                         f"build (no {BUILD_FILE}): refusing to write into it; use a new or empty --out")


def _explain_change(changed: dict) -> str:
    reasons = []
    if "model_hash" in changed:
        before, now = changed.pop("model_hash")
        reasons.append("by another model (its weights or config differ: hash "
                       f"{(before or 'none, from an older vlp')[:12]} → {now[:12]})")
    if "shards" in changed:
        before, now = (set(x or ()) for x in changed.pop("shards"))
        reasons.append(f"from another shard list ({len(before)} shards then, {len(now)} now: "
                       f"{len(now - before)} new, {len(before - now)} left out; --append adds shards)")
    if changed:
        reasons.append("with other settings (" + ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in changed.items()) + ")")
    return " and ".join(reasons)


def embed_shards(encoder: Encoder, shards: list[str], index_dir: Path, settings: EmbedSettings,
                 rank: int = 0, world: int = 1, on_chunk: Optional[Callable[[str], None]] = None,
                 append: bool = False) -> dict[str, int]:
    """Embed this rank's shards into `index_dir/chunks`; returns counts (items, skips…).
    `shards` is the whole list (every rank passes the same); `append` adds shards to an
    existing build instead of refusing a different list."""
    from vlp.model import model_dir_fingerprint  # loaded with the encoder's model

    index_dir = Path(index_dir)
    refuse_foreign(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    if settings.filip_tokens != 0 and not encoder.model.has_filip:
        log.warning("the model has no FILIP heads (loss.filip: 0): storing no image tokens")
        settings.filip_tokens = 0
    settings.model_hash = model_dir_fingerprint(encoder.model_dir)
    settings.shards = [os.path.abspath(s) for s in shards]
    settings.check_against(index_dir, append)
    removed = store.clean_partial(index_dir)
    if removed:
        log.info("removed %d files of unfinished chunks", removed)
    done = store.finished_chunks(index_dir)
    mine = shards[rank::world]
    skips = SkipCounter()
    counts = {"embedded": 0, "resumed_chunks": 0, "chunks": 0}
    bar = tqdm(desc=f"embed rank {rank}", unit="img", dynamic_ncols=True, total=known_sample_count(mine))
    for name, samples in _chunks(mine, settings.chunk_size, skips):
        if name in done:
            counts["resumed_chunks"] += 1
            continue
        n = _embed_chunk(encoder, index_dir, name, samples, settings, skips, bar)
        counts["embedded"] += n
        counts["chunks"] += 1
        if on_chunk is not None:
            on_chunk(name)
    bar.close()
    counts.update({f"skipped_{k}": v for k, v in skips.total.items()})
    return counts


def _chunks(shards: list[str], size: int, skips: SkipCounter) -> Iterator[tuple[str, list[RawSample]]]:
    for shard in shards:
        part, pending = 0, []
        for sample in iter_shard(shard, skips):
            pending.append(sample)
            if len(pending) == size:
                yield store.chunk_name(shard, part), pending
                part, pending = part + 1, []
        if pending or part == 0:
            yield store.chunk_name(shard, part), pending


def _embed_chunk(encoder: Encoder, index_dir: Path, name: str, samples: list[RawSample],
                 settings: EmbedSettings, skips: SkipCounter, bar: tqdm) -> int:
    rows, image_parts, token_parts, captions = [], [], [], []
    for start in range(0, len(samples), settings.batch_size):
        batch = samples[start:start + settings.batch_size]
        tensors = encoder.decode_many([s.image_bytes for s in batch])
        kept = []
        for sample, tensor in zip(batch, tensors):
            if isinstance(tensor, ValueError):
                reason = "image_too_large" if isinstance(tensor, ImageTooLarge) else "bad_image"
                skips.record(reason, f"{sample.shard}:{sample.key}: {tensor}")
            else:
                kept.append((sample, tensor))
        if not kept:
            continue
        images = torch.stack([t for _, t in kept])
        emb, tokens = encoder.image_and_tokens(images, settings.filip_tokens)
        image_parts.append(emb)
        if tokens is not None:
            token_parts.append(tokens)
        for sample, _ in kept:
            rows.append(_row(sample))
            captions += sample.captions
        bar.update(len(kept))
    dims = encoder.cfg.model.embed_dim
    image_emb = np.concatenate(image_parts) if image_parts else np.zeros((0, dims), np.float32)
    text_emb = _embed_texts(encoder, captions if settings.captions else [], settings.batch_size, dims)
    tokens = None
    if settings.filip_tokens != 0:
        tokens = np.concatenate(token_parts) if token_parts else np.zeros((0, 1, encoder.cfg.model.filip_dim), np.float16)
    store.write_chunk(index_dir, name, rows, image_emb, text_emb, tokens, settings.fp16)
    return len(rows)


def _embed_texts(encoder: Encoder, texts: list[str], batch_size: int, dims: int) -> np.ndarray:
    parts = [encoder.text_embeddings(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, dims), np.float32)


def _row(sample: RawSample) -> dict:
    return {"id": store.item_id(sample.key), "key": sample.key, "captions": sample.captions,
            "shard": str(Path(sample.shard).resolve()), "image_member": sample.image_member,
            "image_offset": sample.image_offset, "image_size": sample.image_size,
            "json": json.dumps(sample.json, ensure_ascii=False) if sample.json else ""}

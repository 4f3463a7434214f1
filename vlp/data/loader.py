"""WebDataset loaders: an endless, resampled training stream with equal batches per rank,
and an evaluation pass that sees every sample exactly once across ranks × workers.

Everything after reading the tar (decode, augment, caption choice, MixGen, tokenize,
batching) runs inside the DataLoader workers; the main process only receives batches.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import itertools
import json
import math
import multiprocessing
import random
import weakref
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import get_worker_info

from vlp.config import ConfigError, DataConfig
from vlp.data.images import IMAGE_EXTENSIONS, EvalTransform, ImageTooLarge, TrainTransform, decode_image
from vlp.data.mixgen import mixgen
from vlp.data.skips import SkipCounter
from vlp.data.slots import BatchSlots, SlotRef
from vlp.data.sources import count_samples, expand_spec
from vlp.data.tar import BrokenTar, tar_members
from vlp.data.text import BatchTokenizer
from vlp.ranks import world


def image_id(key: str) -> int:
    """Stable signed int64 id of a sample key (same key ⇒ same id, in every process)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


class _Context:
    """What every stage needs to know about where it runs; copied into each worker."""

    def __init__(self, rank: int, world_size: int, seed: int):
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch = 0  # set in the main process before the workers of an epoch start
        self.skips = SkipCounter()
        self.shards_without_sample = 0
        self.slots: BatchSlots | None = None  # set in the main process before workers fork

    def worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)

    def party(self) -> tuple[int, int]:
        """(index, count) of this worker among all ranks × workers."""
        worker, workers = self.worker()
        return self.rank * workers + worker, self.world_size * workers

    def rng(self, stream: str) -> random.Random:
        # A string seed is hashed with SHA-512: reproducible across processes, unlike hash().
        worker, _ = self.worker()
        return random.Random(f"{self.seed}/{self.rank}/{worker}/{self.epoch}/{stream}")


# --------------------------------------------------------------------------- stages

class _ResampledShards:
    """Endless shard URLs drawn with replacement. Split by node first: with at least as
    many shards as ranks, rank r only draws from shards r, r+world, ... ."""

    def __init__(self, ctx: _Context, urls: list[str]):
        self.ctx, self.urls = ctx, urls

    def __call__(self) -> Iterator[dict]:
        ctx = self.ctx
        own = self.urls[ctx.rank::ctx.world_size] if len(self.urls) >= ctx.world_size else self.urls
        rng = ctx.rng("shards")
        while True:
            yield {"url": rng.choice(own)}


class _EvalShards:
    """Each shard once. With at least one shard per (rank, worker) the shards are split;
    with fewer, every worker reads all of them and `_EvalSampleSplit` splits samples."""

    def __init__(self, ctx: _Context, urls: list[str]):
        self.ctx, self.urls = ctx, urls

    def __call__(self) -> Iterator[dict]:
        party, parties = self.ctx.party()
        split_shards = len(self.urls) >= parties
        # Otherwise every worker reads every tar, and only one of them reports a broken one.
        self.ctx.skips.count_shard_errors = split_shards or party == 0
        for url in self.urls[party::parties] if split_shards else self.urls:
            yield {"url": url}


class _ReadSamples:
    """Shard URLs → samples {"__key__", "__url__", ext: bytes, ...}: consecutive tar members
    sharing a key (the name up to the first dot of its last path part) form one sample, and
    samples never straddle shards. A broken tar yields what precedes the damage."""

    def __init__(self, ctx: _Context, give_up_after: int | None = None):
        # Training resamples forever: if nothing decodes, fail loudly instead of spinning.
        self.ctx, self.give_up_after = ctx, give_up_after

    def __call__(self, shards: Iterator[dict]) -> Iterator[dict]:
        ctx, skips = self.ctx, self.ctx.skips
        for shard in shards:
            url = shard["url"]
            ctx.shards_without_sample += 1
            if self.give_up_after and ctx.shards_without_sample > self.give_up_after:
                raise RuntimeError(
                    f"no usable sample in the last {self.give_up_after} shards read (last: {url}); "
                    f"skipped so far: {dict(skips.total)}")
            skips.begin_shard(url)
            try:
                stream = wds.gopen(url)
            except Exception as err:
                skips.handler(err)
                continue
            sample: dict = {}
            try:
                if url.endswith((".gz", ".tgz")):
                    stream = gzip.GzipFile(fileobj=stream)
                for fname, data in tar_members(stream):
                    slash = fname.rfind("/") + 1
                    dot = fname.find(".", slash)
                    if dot < 0:
                        continue  # no extension: not part of a sample
                    key, ext = fname[:dot], fname[dot + 1:].lower()
                    if sample.get("__key__") != key or ext in sample:
                        if sample:
                            yield sample
                        sample = {"__key__": key, "__url__": url}
                    sample[ext] = data
            except (BrokenTar, OSError, EOFError) as err:
                skips.shard_error(f"{type(err).__name__}: {err}")
            finally:
                stream.close()
            if sample:
                yield sample


class _EvalSampleSplit:
    def __init__(self, ctx: _Context, num_urls: int):
        self.ctx, self.num_urls = ctx, num_urls

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        party, parties = self.ctx.party()
        if self.num_urls >= parties:
            yield from samples
            return
        for index, sample in enumerate(samples):
            if index % parties == party:
                yield sample


class _Shuffle:
    def __init__(self, ctx: _Context, size: int):
        self.ctx, self.size = ctx, size

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        rng, buffer = self.ctx.rng("shuffle"), []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.size:
                i = rng.randrange(len(buffer))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer


def parse_sample(sample: dict, skips: SkipCounter) -> tuple[bytes, list[str], dict] | None:
    """Raw tar members → (image bytes, captions, json metadata), or None after recording why.
    Captions: the .txt first, then json "captions" (a list or a string), blanks dropped."""
    where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
    image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image is None:
        skips.record("missing_image", f"{where} has no .{'/.'.join(IMAGE_EXTENSIONS)} member")
        return None
    meta: dict = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"].decode("utf-8"))
            if not isinstance(meta, dict):
                raise ValueError(f"top level is {type(meta).__name__}, not an object")
        except (UnicodeDecodeError, ValueError) as err:
            skips.record("bad_json", f"{where}.json: {err}")
            return None
    captions = []
    if "txt" in sample:
        try:
            captions.append(sample["txt"].decode("utf-8"))
        except UnicodeDecodeError as err:
            skips.record("bad_text", f"{where}.txt is not UTF-8: {err}")
            return None
    extra = meta.get("captions", [])
    captions += [extra] if isinstance(extra, str) else [c for c in extra if isinstance(c, str)]
    if not captions:
        skips.record("missing_caption", f"{where} has no .txt and no json 'captions'")
        return None
    captions = [c.strip() for c in captions if c.strip()]
    if not captions:
        skips.record("empty_caption", f"{where}: every caption is blank")
        return None
    return image, captions, meta


class _Parse:
    """Raw tar members → {"key", "url", "image" (bytes), "captions", "meta"}; samples
    without a usable image member or caption are counted and dropped here."""

    def __init__(self, ctx: _Context):
        self.ctx = ctx

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            parsed = parse_sample(sample, self.ctx.skips)
            if parsed is not None:
                image, captions, meta = parsed
                yield {"key": sample["__key__"], "url": sample["__url__"], "image": image,
                       "captions": captions, "meta": meta}


def _to_tensors(passes: weakref.WeakValueDictionary, batch: dict) -> dict:
    """Runs in the main process. Batches cross from the workers with images as uint8 in a
    batch slot (or, when none was free, a shared tensor) and the small int64 arrays as
    numpy, pickled by value. Images stay uint8 (the vision tower normalizes them on the
    model's device). `passes`: the batch slots of every pass still being iterated, by token."""
    for name, value in batch.items():
        if isinstance(value, np.ndarray):
            batch[name] = torch.from_numpy(value)
        elif isinstance(value, SlotRef):
            batch[name] = passes[value.token].lease(value)
    return batch


class _Batch:
    """Parsed samples → batch dicts. Images are decoded a batch at a time, straight into the
    batch's memory (shared with the main process when in a worker): the decoder then runs in
    a tight loop, as fast as a plain loop over the same images, instead of taking turns with
    tar reading and tokenization for every sample (that alone cost ~10% on the demo glyphs).
    An undecodable image is counted and its place taken by the next sample, so batches stay
    full. A batch is handed on once the next one is decoded, so skips counted in between
    (and at the end of the stream) are reported with it."""

    def __init__(self, ctx: _Context, cfg: DataConfig, tokenizer, transform, train: bool):
        self.ctx, self.cfg, self.transform, self.train = ctx, cfg, transform, train
        self.tokenize = BatchTokenizer(tokenizer, cfg.max_len) if tokenizer is not None else None
        self.size = cfg.batch_size if train else cfg.eval_batch_size

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        # Two streams, so the crops do not depend on how many captions the batches had.
        augment_rng, batch_rng = self.ctx.rng("augment"), self.ctx.rng("batch")
        done: dict | None = None
        while True:
            slot, images, kept = self.decode_batch(samples, augment_rng)
            if done is not None:
                done["skipped"] = self.ctx.skips.take()
                yield done
            if not kept:
                if slot is not None:
                    self.ctx.slots.give_back(slot.index)
                return
            done = self.collate(images, kept, batch_rng)
            if slot is not None:
                if done["image"] is not images:  # MixGen's blend is a new tensor
                    images.copy_(done["image"])
                slot.count = len(kept)
                done["image"] = slot

    def decode_batch(self, samples: Iterator[dict], rng: random.Random) -> tuple[SlotRef | None, torch.Tensor, list[dict]]:
        """(batch slot or None, up to `size` decoded images [n, 3, S, S] uint8, the samples
        they came from)."""
        slot, images = self.buffer()
        pixels, kept = images.numpy(), []
        while len(kept) < self.size:
            todo = list(itertools.islice(samples, self.size - len(kept)))
            if not todo:
                break
            for sample in todo:
                try:
                    img = decode_image(sample["image"], self.transform.min_side, self.cfg.max_image_pixels)
                except Exception as err:  # PIL raises many types for bad bytes
                    reason = "image_too_large" if isinstance(err, ImageTooLarge) else "bad_image"
                    self.ctx.skips.record(reason, f"{sample['url']}:{sample['key']}: {err}")
                    continue
                pixels[len(kept)] = np.asarray(self.transform(img, rng)).transpose(2, 0, 1)
                kept.append(sample)
                self.ctx.shards_without_sample = 0
        return slot, images[:len(kept)], kept

    def buffer(self) -> tuple[SlotRef | None, torch.Tensor]:
        """Where a batch's images are decoded to. In a worker, memory the main process reads
        as is: a batch slot if one is free, else a shared tensor."""
        shape = _batch_shape(self.cfg, self.size)
        if get_worker_info() is None:
            return None, torch.empty(shape, dtype=torch.uint8)
        taken = self.ctx.slots.take() if self.ctx.slots is not None else None
        return taken or (None, torch.empty(shape, dtype=torch.uint8).share_memory_())

    def collate(self, images: torch.Tensor, samples: list[dict], rng: random.Random) -> dict[str, Any]:
        keys = [s["key"] for s in samples]
        batch: dict[str, Any] = {
            "image": images,
            "key": keys,
            "image_id": np.array([image_id(k) for k in keys], dtype=np.int64),
        }
        if self.train:
            pick = rng.choice if self.cfg.train_captions == "all" else (lambda captions: captions[0])
            texts = [pick(s["captions"]) for s in samples]
            batch["image"], texts = mixgen(images, texts, self.cfg.mixgen_prob, self.cfg.mixgen_lambda, rng)
        else:
            texts = [c for s in samples for c in s["captions"]]
            batch["text_image_index"] = np.array(
                [i for i, s in enumerate(samples) for _ in s["captions"]], dtype=np.int64)
            batch["meta"] = [s["meta"] for s in samples]
        batch["text"] = texts
        if self.tokenize is not None:
            batch.update(self.tokenize(texts))
        return batch


# --------------------------------------------------------------------------- loaders

_FORK = "fork" in multiprocessing.get_all_start_methods()
_PREFETCH = 2  # batches each worker has ready or in the making
# Slots a worker can fill before its oldest comes back: its prefetched batches, the one
# the consumer holds and the one it held until the next arrived, plus one to spare.
_SLOTS_PER_WORKER = _PREFETCH + 3


class _Loader:
    """A WebLoader whose every pass gets fresh batch slots for the workers that fork for it
    (a pass dropped midway can leave slots in flight that never come back)."""

    def __init__(self, loader: wds.WebLoader, ctx: _Context, passes: weakref.WeakValueDictionary,
                 workers: int, batch_shape: tuple[int, ...]):
        self.loader, self.ctx, self.passes = loader, ctx, passes
        self.workers, self.batch_shape = workers, batch_shape

    def __iter__(self) -> Iterator[dict]:
        if not (self.workers > 0 and _FORK):
            return iter(self.loader)
        slots = BatchSlots(self.workers, _SLOTS_PER_WORKER, self.batch_shape)
        self.ctx.slots = self.passes[slots.token] = slots
        return _holding(slots, iter(self.loader))


def _holding(slots: BatchSlots, batches: Iterator[dict]) -> Iterator[dict]:
    """One pass's batches; the generator keeps the pass's slots alive (and in `passes`)."""
    yield from batches


class TrainLoader(_Loader):
    """`WebLoader(...).with_epoch(num_batches)` plus the epoch number the workers seed from.

    Every rank yields exactly `len(loader)` batches per epoch. Iterating again starts the
    next epoch (new shard draws, shuffles and crops); `set_epoch(e)` picks one explicitly,
    e.g. when resuming. Workers are not persistent, so each epoch's workers see its number."""

    def __init__(self, loader: wds.WebLoader, ctx: _Context, passes: weakref.WeakValueDictionary,
                 cfg: DataConfig, num_batches: int, num_samples: int):
        super().__init__(loader, ctx, passes, cfg.workers, _batch_shape(cfg, cfg.batch_size))
        self.num_batches, self.num_samples = num_batches, num_samples
        self.next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.next_epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        self.ctx.epoch = self.next_epoch
        self.next_epoch += 1
        return super().__iter__()


class EvalLoader(_Loader):
    """One pass over the evaluation samples per iteration. `num_samples` (all ranks
    together, for progress bars) is None when neither sizes.json nor a count is known."""

    def __init__(self, loader: wds.WebLoader, ctx: _Context, passes: weakref.WeakValueDictionary,
                 cfg: DataConfig, num_samples: int | None):
        super().__init__(loader, ctx, passes, cfg.workers, _batch_shape(cfg, cfg.eval_batch_size))
        self.num_samples = num_samples


def _batch_shape(cfg: DataConfig, batch_size: int) -> tuple[int, ...]:
    return batch_size, 3, cfg.image_size, cfg.image_size


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """The given rank and world size, each defaulting to torch.distributed's."""
    default_rank, default_world = world()
    rank = default_rank if rank is None else rank
    world_size = default_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return rank, world_size


def _web_loader(pipeline: wds.DataPipeline, workers: int) -> wds.WebLoader:
    # Fork where the OS has it: a rank started with the "spawn" method would otherwise
    # spawn its workers too, re-importing torch in each of them at every epoch.
    context = "fork" if workers > 0 and _FORK else None
    # batch_size=None: batches are made inside the dataset (in the workers). `_as_is`
    # instead of the default conversion, which would turn the numpy arrays into shared tensors.
    # A generator of its own: torch draws the workers' base seed from it at every epoch;
    # from the global RNG, that draw would shift dropout and ITM sampling by one whenever an
    # epoch starts, so a resumed run (whose epoch starts at a restored RNG state) would
    # not repeat the run it continues. Nothing in the workers uses torch's RNG.
    return wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=workers,
                         persistent_workers=False, prefetch_factor=_PREFETCH if workers > 0 else None,
                         multiprocessing_context=context, collate_fn=_as_is,
                         generator=torch.Generator().manual_seed(0))


def _as_is(batch: dict) -> dict:
    return batch


def train_loader(cfg: DataConfig, tokenizer, *, rank: int | None = None,
                 world_size: int | None = None) -> TrainLoader:
    """Endless resampled training batches from `cfg.train`; an epoch is
    ceil(samples / (batch_size · world_size)) batches on every rank.
    `rank`/`world_size` default to torch.distributed's (or 0/1 when it is not initialized)."""
    rank, world_size = _rank_and_world(rank, world_size)
    urls = expand_spec(cfg.train, "data.train")
    num_samples = count_samples(urls, cfg.train_samples, "data.train_samples")
    num_batches = max(1, math.ceil(num_samples / (cfg.batch_size * world_size)))
    ctx = _Context(rank, world_size, cfg.seed)
    pipeline = wds.DataPipeline(
        _ResampledShards(ctx, urls),
        _ReadSamples(ctx, give_up_after=cfg.shuffle_buffer + 100 * len(urls)),
        _Shuffle(ctx, cfg.shuffle_buffer),
        _Parse(ctx),
        _Batch(ctx, cfg, tokenizer, TrainTransform(cfg), train=True),
    )
    passes = weakref.WeakValueDictionary()
    loader = _web_loader(pipeline, cfg.workers).map(functools.partial(_to_tensors, passes))
    return TrainLoader(loader.with_epoch(num_batches), ctx, passes, cfg, num_batches, num_samples)


def eval_loader(cfg: DataConfig, tokenizer, *, spec: str | None = None, rank: int | None = None,
                world_size: int | None = None) -> EvalLoader:
    """One pass over `spec` (default `cfg.val`): each sample exactly once across all ranks
    and workers, in batches of `cfg.eval_batch_size` (the last one may be smaller; ranks may
    get different numbers of batches). `tokenizer=None` leaves the text untokenized."""
    rank, world_size = _rank_and_world(rank, world_size)
    urls = expand_spec(spec or cfg.val, "data.val" if spec is None else "eval spec")
    ctx = _Context(rank, world_size, cfg.seed)
    pipeline = wds.DataPipeline(
        _EvalShards(ctx, urls),
        _ReadSamples(ctx),
        _EvalSampleSplit(ctx, len(urls)),
        _Parse(ctx),
        _Batch(ctx, cfg, tokenizer, EvalTransform(cfg), train=False),
    )
    passes = weakref.WeakValueDictionary()
    loader = _web_loader(pipeline, cfg.workers).map(functools.partial(_to_tensors, passes))
    try:
        num_samples = count_samples(urls, cfg.val_samples if spec is None else None, "data.val_samples")
    except ConfigError:
        num_samples = None
    return EvalLoader(loader, ctx, passes, cfg, num_samples)

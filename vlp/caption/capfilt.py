"""CapFilt (BLIP, Li et al. 2022): bootstrap cleaner captions from noisy image-text shards.

For every image the captioner writes `synthetic` captions by nucleus sampling (BLIP: nucleus,
not beam, for diversity); the filter scores every original and synthetic caption against
the image (ITM match probability, or ITC cosine); captions at or above `threshold` (and/or
the `top_m` best) are kept. An image left with none is dropped, or keeps its best caption
(`empty: best`).

Each input shard becomes one output shard of the same name, in img2dataset layout: the key,
the image bytes and every other member unchanged; `.txt` the best kept caption; the json
keeps every field, its `captions` the other kept captions, plus `capfilt`: one entry per
candidate, {"text", "source": "original" | "synthetic", "score", "kept"}, so the filter can
be audited. Texts are deduplicated per image before scoring (originals first).

A dropped image is not in the output shards; its key and candidates are listed in
`capfilt/NAME.dropped.jsonl`, so the audit covers every image.

Work is split by shard (`shards[rank::world]`). A shard is done when its output tar and its
stats file `capfilt/NAME.json` exist (all written atomically, the stats last), so a
restarted run redoes only unfinished shards; nucleus sampling is seeded per shard, so the
output does not depend on the split or on restarts. Whoever finishes the last shard writes
the summary (vlp/caption/capfilt_stats.py).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from tqdm import tqdm

from vlp.atomic import atomic_write_json
from vlp.caption import capfilt_stats
from vlp.caption.evaluate import detokenize
from vlp.data.images import EvalTransform, decode_image, to_uint8_tensor
from vlp.data.loader import parse_sample
from vlp.data.skips import SkipCounter
from vlp.data.tar import BrokenTar, member_extension, tar_samples
from vlp.data.text import tokenize
from vlp.data.writer import write_shard
from vlp.model.scoring import itm_pair_scores
from vlp.padding import trim_padding

log = logging.getLogger(__name__)
SCORES = ("itm", "itc")
EMPTY = ("drop", "best")


@dataclass
class CapFiltSettings:
    synthetic: int = 1            # nucleus captions per image (BLIP: 1)
    top_p: float = 0.9
    max_new_tokens: Optional[int] = None  # None: the model's decoder.max_new_tokens
    score: str = "itm"            # itm: match probability in [0, 1]; itc: cosine in [-1, 1]
    threshold: Optional[float] = 0.5  # None: no threshold (top_m alone)
    top_m: int = 0                # keep at most the m best per image (0: no cap)
    empty: str = "drop"           # an image with no caption kept: drop it, or keep its best
    seed: int = 0
    batch_size: int = 32          # images per step; part of the settings (it orders sampling)

    def check(self) -> None:
        problems = []
        if self.synthetic < 0:
            problems.append(f"synthetic captions per image must be >= 0, got {self.synthetic}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.score not in SCORES:
            problems.append(f"score must be one of {SCORES}, got {self.score!r}")
        if self.empty not in EMPTY:
            problems.append(f"empty must be one of {EMPTY}, got {self.empty!r}")
        if self.top_m < 0:
            problems.append(f"top_m must be >= 0, got {self.top_m}")
        if self.threshold is None and self.top_m == 0:
            problems.append("give a threshold, a top_m, or both: otherwise every caption is kept")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class _Sample:
    key: str
    members: dict[str, bytes]
    captions: list[str]
    meta: dict
    image: torch.Tensor  # uint8 [3, S, S]


class CapFilt:
    """One model (captioner + filter) applied to shards with fixed settings."""

    def __init__(self, model, tokenizer, data_cfg, settings: CapFiltSettings,
                 device: str | torch.device = "cpu"):
        settings.check()
        if not model.has_decoder:
            raise ValueError("CapFilt needs a captioning decoder (model.decoder.enabled: true)")
        if settings.score == "itm" and not model.has_itm:
            raise ValueError("score 'itm' needs an ITM head (model.text.fusion_layers >= 1); use score 'itc'")
        self.model, self.tokenizer, self.settings = model.eval(), tokenizer, settings
        self.data_cfg, self.device = data_cfg, torch.device(device)
        self.resize = EvalTransform(data_cfg)

    # ------------------------------------------------------------------ shards
    def run(self, shards: list[str], out_dir: str | Path, rank: int = 0, world: int = 1,
            model_name: str = "") -> dict:
        """Filter this rank's shards into `out_dir`; returns the summary when every shard of
        `shards` is done (this rank finished the last one), else this rank's counts."""
        out_dir = Path(out_dir)
        names = capfilt_stats.output_names(shards)
        capfilt_stats.check_settings(out_dir, {**asdict(self.settings), "model": model_name})
        mine = list(zip(shards, names))[rank::world]
        todo = [(src, name) for src, name in mine if not capfilt_stats.shard_done(out_dir, name)]
        if len(todo) < len(mine):
            log.info("resuming: %d of this rank's %d shards are already done", len(mine) - len(todo), len(mine))
        bar = tqdm(desc=f"capfilt rank {rank}", unit="img", dynamic_ncols=True,
                   total=capfilt_stats.known_size([src for src, _ in todo]))
        for src, name in todo:
            stats, dropped = capfilt_stats.new_stats(self.settings.score), []
            write_shard(out_dir / name, self._filtered(src, name, stats, dropped, bar))
            capfilt_stats.save_dropped(out_dir, name, dropped)
            capfilt_stats.save_shard_stats(out_dir, name, stats)
        bar.close()
        done = capfilt_stats.merge_if_complete(out_dir, names, {**asdict(self.settings), "model": model_name})
        if done is not None:
            return done
        return {"rank": rank, "shards_done_by_this_rank": len(todo),
                "waiting_for": sum(not capfilt_stats.shard_done(out_dir, n) for n in names)}

    def _filtered(self, src: str, name: str, stats: dict, dropped: list[dict], bar: tqdm) -> Iterator[dict]:
        """The shard's output samples; images left without a caption go to `dropped`."""
        generator = torch.Generator(self.device).manual_seed(_shard_seed(self.settings.seed, name))
        skips = SkipCounter()
        for batch in self._batches(src, skips):
            candidates = self.filter_batch(batch, generator)
            for sample, chosen in zip(batch, candidates):
                capfilt_stats.count(stats, chosen)
                if any(c["kept"] for c in chosen):
                    yield _output_sample(sample, chosen)
                else:
                    dropped.append({"key": sample.key, "capfilt": chosen})
            bar.update(len(batch))
            bar.set_postfix(images_kept=stats["images"]["written"], dropped=stats["images"]["dropped"])
        stats["skipped"] = dict(skips.total)

    def _batches(self, src: str, skips: SkipCounter) -> Iterator[list[_Sample]]:
        batch = []
        for sample in self._samples(src, skips):
            batch.append(sample)
            if len(batch) == self.settings.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _samples(self, src: str, skips: SkipCounter) -> Iterator[_Sample]:
        try:
            with open(src, "rb") as stream:
                for key, entries in tar_samples(stream):
                    members = {member_extension(name): data for name, _, data in entries}
                    parsed = parse_sample({"__key__": key, "__url__": src, **members}, skips)
                    if parsed is None:
                        continue
                    image_bytes, captions, meta = parsed
                    try:
                        image = to_uint8_tensor(self.resize(decode_image(image_bytes, self.data_cfg.image_size)))
                    except Exception as err:  # PIL raises many types for bad bytes
                        skips.record("bad_image", f"{src}:{key}: {err}")
                        continue
                    yield _Sample(key, members, captions, meta, image)
        except (BrokenTar, OSError) as err:
            # The sample the damage cut into goes with the counted bad tar.
            skips.record("bad_tar", f"{src}: {err}")

    # ------------------------------------------------------------------ one batch
    @torch.no_grad()
    def filter_batch(self, batch: list[_Sample], generator: torch.Generator) -> list[list[dict]]:
        """Per image its candidates {"text", "source", "score", "kept"}, originals first."""
        states = self.model.encode_image_states(torch.stack([s.image for s in batch]).to(self.device))
        synthetic = self._synthesize(states, generator)
        candidates = [_candidates(s.captions, synthetic[i]) for i, s in enumerate(batch)]
        texts = [c["text"] for cands in candidates for c in cands]
        owner = torch.tensor([i for i, cands in enumerate(candidates) for _ in cands], device=self.device)
        scores = iter(self._scores(states, texts, owner).tolist())
        for cands in candidates:
            for c in cands:
                c["score"] = round(next(scores), 6)
            _choose(cands, self.settings)
        return candidates

    def _synthesize(self, states: torch.Tensor, generator: torch.Generator) -> list[list[str]]:
        n = self.settings.synthetic
        if n == 0:
            return [[] for _ in range(states.shape[0])]
        ids = self.model.generate_ids(None, method="nucleus", image_states=states.repeat_interleave(n, 0),
                                      max_new_tokens=self.settings.max_new_tokens,
                                      top_p=self.settings.top_p, generator=generator)
        texts = [detokenize(t) for t in self.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)]
        return [texts[i * n:(i + 1) * n] for i in range(states.shape[0])]

    def _scores(self, states: torch.Tensor, texts: list[str], owner: torch.Tensor) -> torch.Tensor:
        tokens = tokenize(self.tokenizer, texts, self.data_cfg.max_len)
        ids, mask = trim_padding(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))
        text_states = self.model.encode_text_states(ids, mask)
        if self.settings.score == "itm":
            return itm_pair_scores(self.model, states, text_states, mask, owner,
                                   torch.arange(len(texts), device=states.device), self.settings.batch_size)
        image_emb = self.model.encode_image(image_states=states)
        text_emb = self.model.encode_text(attention_mask=mask, text_states=text_states)
        return (image_emb[owner] * text_emb).sum(-1).float().cpu()


def _candidates(originals: list[str], synthetic: list[str]) -> list[dict]:
    """Unique texts (originals first); a blank synthetic caption is no candidate."""
    seen, out = set(), []
    for source, texts in (("original", originals), ("synthetic", synthetic)):
        for text in texts:
            if text and text not in seen:
                seen.add(text)
                out.append({"text": text, "source": source, "score": None, "kept": False})
    return out


def _choose(candidates: list[dict], settings: CapFiltSettings) -> None:
    """Mark `kept`: at or above the threshold, at most top_m of them (best first); none
    left → the best one when `empty` is "best"."""
    order = sorted(range(len(candidates)), key=lambda i: -candidates[i]["score"])
    kept = [i for i in order if settings.threshold is None or candidates[i]["score"] >= settings.threshold]
    if settings.top_m:
        kept = kept[:settings.top_m]
    if not kept and settings.empty == "best":
        kept = order[:1]
    for i in kept:
        candidates[i]["kept"] = True


def _output_sample(sample: _Sample, candidates: list[dict]) -> dict:
    best_first = sorted((c for c in candidates if c["kept"]), key=lambda c: -c["score"])
    texts = [c["text"] for c in best_first]
    out = {"__key__": sample.key}
    out.update({ext: data for ext, data in sample.members.items() if ext not in ("txt", "json")})
    out["txt"] = texts[0]
    out["json"] = {**sample.meta, "captions": texts[1:], "capfilt": candidates}
    return out


def _shard_seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)

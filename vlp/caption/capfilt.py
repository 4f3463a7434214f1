"""CapFilt (BLIP, Li et al. 2022): bootstrap cleaner captions from noisy image-text shards.

For every image the captioner writes `synthetic` captions by nucleus sampling (BLIP: nucleus,
not beam, for diversity); the filter scores every original and synthetic caption against
the image (ITM match probability, ITC cosine, or the cosine's CSLS within the shard:
corrected for captions and images that are close to everything); captions at or above
`threshold` (a number, or "auto": where a two-Gaussian mixture of the shard's original
captions' scores splits them) and/or the `top_m` best are kept. An image left with none is
dropped, keeps its best caption (`empty: best`), or keeps it only when it scores at least
halfway from the mixture's low mean to its threshold (`empty: likely`, the default).

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
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch
from tqdm import tqdm

from vlp.atomic import atomic_write_json
from vlp.caption import capfilt_stats
from vlp.caption.evaluate import detokenize
from vlp.data.images import EvalTransform, decode_image, to_uint8_tensor
from vlp.data.shard_reader import parsed_samples
from vlp.data.skips import SkipCounter
from vlp.data.text import tokenize
from vlp.data.writer import write_shard
from vlp.model.scoring import itm_pair_scores
from vlp.padding import trim_padding

log = logging.getLogger(__name__)
SCORES = ("itm", "itc", "csls")
EMPTY = ("drop", "best", "likely")


@dataclass
class CapFiltSettings:
    synthetic: int = 1            # nucleus captions per image (BLIP: 1)
    top_p: float = 0.9
    max_new_tokens: Optional[int] = None  # None: the model's decoder.max_new_tokens
    # The defaults are the filter measured to work (docs/training.md, CapFilt): BLIP's ITM
    # filter (score "itm", threshold 0.5, empty "drop") was blind wherever ITM had not left its
    # constant guess, and any model has ITC; the mixture needs no threshold fitted to a score scale.
    score: str = "csls"           # itm: match probability in [0, 1]; itc: cosine in [-1, 1];
    #                               csls: the cosine corrected for hubness within the shard
    csls_k: int = 10              # csls: neighbours per image / caption
    threshold: Optional[float | str] = "auto"  # None: no threshold (top_m alone); "auto": per shard,
    #                               where a two-Gaussian mixture of its original captions' scores splits
    top_m: int = 0                # keep at most the m best per image (0: no cap)
    # An image with no caption kept: drop it, keep its best, or ("likely", with threshold
    # "auto") keep its best when it scores at least the midpoint of the mixture's low mean
    # and its threshold (docs/training.md, CapFilt).
    empty: str = "likely"
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
        if self.csls_k < 1:
            problems.append(f"csls_k must be >= 1, got {self.csls_k}")
        if self.top_m < 0:
            problems.append(f"top_m must be >= 0, got {self.top_m}")
        if isinstance(self.threshold, str) and self.threshold != "auto":
            problems.append(f"threshold must be a number, 'auto' or None, got {self.threshold!r}")
        if self.empty == "likely" and isinstance(self.threshold, (int, float)):
            problems.append(f"empty 'likely' reads the mixture of threshold 'auto'; with threshold "
                            f"{self.threshold} choose --empty best or --empty drop")
        if self.threshold is None and self.top_m == 0:
            problems.append("give a threshold, a top_m (--top-m), or both: otherwise every caption is kept")
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
    image: Optional[torch.Tensor]  # uint8 [3, S, S]; None once scored


class CapFilt:
    """One model (captioner + filter) applied to shards with fixed settings."""

    def __init__(self, model, tokenizer, data_cfg, settings: CapFiltSettings,
                 device: str | torch.device = "cpu"):
        settings.check()
        if settings.synthetic and not model.has_decoder:
            raise ValueError("synthetic captions need a captioning decoder, and this model was trained "
                             "with loss.lm: 0; pretrain with loss.lm > 0 or filter only (--synthetic 0)")
        if settings.score == "itm" and not model.has_itm:
            raise ValueError("score 'itm' needs an ITM head, and this model was trained with loss.itm: 0; "
                             "score with --score csls (the default) or itc")
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
        """The shard's output samples; images left without a caption go to `dropped`. The
        whole shard is scored before anything is kept: CSLS compares each pair with the
        shard's other images and captions (the shard's members are held in memory)."""
        generator = torch.Generator(self.device).manual_seed(_shard_seed(self.settings.seed, name))
        skips = SkipCounter()
        samples, candidates, pools = [], [], []
        for batch in self._batches(src, skips):
            scored, pool = self.score_batch(batch, generator)
            samples += batch
            candidates += scored
            pools.append(pool)
            bar.update(len(batch))
        if self.settings.score == "csls" and samples:
            _set_scores(candidates, _csls_scores(pools, self.settings.csls_k))
        threshold, fallback = self.settings.threshold, None
        if threshold == "auto":
            originals = [c["score"] for cands in candidates for c in cands if c["source"] == "original"]
            split = mixture_split(originals)
            threshold, fallback = split if split else (None, None)
            if split is None:
                log.warning("%s: the scores of its %d original captions do not split into two groups; "
                            "no threshold, so the shard is kept unfiltered (its threshold is null in "
                            "capfilt.json)", name, len(originals))
            stats["threshold"] = threshold
        for sample, chosen in zip(samples, candidates):
            _choose(chosen, self.settings, threshold, fallback)
            capfilt_stats.count(stats, chosen)
            if any(c["kept"] for c in chosen):
                yield _output_sample(sample, chosen)
            else:
                dropped.append({"key": sample.key, "capfilt": chosen})
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
        for sample in parsed_samples(src, skips):
            try:
                image = to_uint8_tensor(self.resize(decode_image(sample.image_bytes, self.data_cfg.image_size)))
            except Exception as err:  # PIL raises many types for bad bytes
                skips.record("bad_image", f"{src}:{sample.key}: {err}")
                continue
            yield _Sample(sample.key, sample.contents, sample.captions, sample.meta, image)

    # ------------------------------------------------------------------ one batch
    @torch.no_grad()
    def score_batch(self, batch: list[_Sample], generator: torch.Generator) -> tuple[list[list[dict]], _Pool]:
        """Per image its candidates {"text", "source", "score", "kept": False}, originals
        first, and the embeddings CSLS needs (None for the other scores). The decoded
        images are released: the shard's scoring holds only their bytes."""
        states = self.model.encode_image_states(torch.stack([s.image for s in batch]).to(self.device))
        for sample in batch:
            sample.image = None
        synthetic = self._synthesize(states, generator)
        candidates = [_candidates(s.captions, synthetic[i]) for i, s in enumerate(batch)]
        texts = [c["text"] for cands in candidates for c in cands]
        owner = torch.tensor([i for i, cands in enumerate(candidates) for _ in cands], device=self.device)
        scores, pool = self._scores(states, texts, owner)
        _set_scores(candidates, scores)
        return candidates, pool

    def _synthesize(self, states: torch.Tensor, generator: torch.Generator) -> list[list[str]]:
        n = self.settings.synthetic
        if n == 0:
            return [[] for _ in range(states.shape[0])]
        ids = self.model.generate_ids(None, method="nucleus", image_states=states.repeat_interleave(n, 0),
                                      max_new_tokens=self.settings.max_new_tokens,
                                      top_p=self.settings.top_p, generator=generator)
        texts = [detokenize(t) for t in self.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)]
        return [texts[i * n:(i + 1) * n] for i in range(states.shape[0])]

    def _scores(self, states: torch.Tensor, texts: list[str], owner: torch.Tensor) -> tuple[torch.Tensor, _Pool]:
        tokens = tokenize(self.tokenizer, texts, self.data_cfg.max_len)
        ids, mask = trim_padding(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))
        text_states = self.model.encode_text_states(ids, mask)
        if self.settings.score == "itm":
            return itm_pair_scores(self.model, states, text_states, mask, owner,
                                   torch.arange(len(texts), device=states.device), self.settings.batch_size), None
        image_emb = self.model.encode_image(image_states=states).float().cpu()
        text_emb = self.model.encode_text(attention_mask=mask, text_states=text_states).float().cpu()
        owner = owner.cpu()
        pool = (image_emb, text_emb, owner) if self.settings.score == "csls" else None
        return (image_emb[owner] * text_emb).sum(-1), pool


_Pool = Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # image emb, text emb, image of each text


def _csls_scores(pools: list[_Pool], k: int, rows: int = 4096) -> torch.Tensor:
    """Each pair's CSLS score within the shard, in the pools' caption order (Conneau et
    al. 2018): 2 cos(i, t) - r(t) - r(i), where r(t) is the mean cosine of caption t to its
    k nearest images of the shard and r(i) that of image i to its k nearest captions. A
    caption that is close to every image (a hub), or an image close to every caption, no
    longer passes on that alone."""
    images, offsets = [], 0
    texts, owners = [], []
    for image_emb, text_emb, owner in pools:
        images.append(image_emb)
        texts.append(text_emb)
        owners.append(owner + offsets)
        offsets += image_emb.shape[0]
    image_emb, text_emb, owner = torch.cat(images), torch.cat(texts), torch.cat(owners)
    k_images, k_texts = min(k, image_emb.shape[0]), min(k, text_emb.shape[0])
    own, text_hub, image_top = [], [], torch.empty(0, image_emb.shape[0])
    for start in range(0, text_emb.shape[0], rows):  # [texts, images] in slices: a 10k-image shard fits
        sim = text_emb[start:start + rows] @ image_emb.T
        own.append(sim.gather(1, owner[start:start + rows, None])[:, 0])
        text_hub.append(sim.topk(k_images, dim=1).values.mean(1))
        image_top = torch.cat([image_top, sim]).topk(min(k_texts, image_top.shape[0] + sim.shape[0]), dim=0).values
    return 2 * torch.cat(own) - torch.cat(text_hub) - image_top.mean(0)[owner]


def _set_scores(candidates: list[list[dict]], scores: torch.Tensor) -> None:
    """Write `scores` (one per candidate, in order) into the candidates, rounded for the json."""
    values = iter(scores.tolist())
    for cands in candidates:
        for c in cands:
            c["score"] = round(next(values), 6)


def _candidates(originals: list[str], synthetic: list[str]) -> list[dict]:
    """Unique texts (originals first); a blank synthetic caption is no candidate."""
    seen, out = set(), []
    for source, texts in (("original", originals), ("synthetic", synthetic)):
        for text in texts:
            if text and text not in seen:
                seen.add(text)
                out.append({"text": text, "source": source, "score": None, "kept": False})
    return out


class MixtureSplit(NamedTuple):
    threshold: float  # scores at or above it are kept
    fallback: float   # empty "likely": an image's best caption is kept at or above it


def mixture_split(scores: list[float], iterations: int = 300) -> Optional[MixtureSplit]:
    """Where a two-Gaussian mixture fitted to `scores` (EM) starts calling a score "high":
    the lowest score above the low component's mean whose posterior for the high component
    is at least 1/2. The noisy-label split of DivideMix (Li et al. 2020) and NCR (Huang et
    al. 2021), here on filter scores: it needs no threshold tuned to a data set's score
    scale. The fallback is halfway from the low mean to the threshold: an image whose
    captions all fall short keeps a best one that reaches it. None
    (keep everything) when there are too few scores to fit two components."""
    x = np.sort(np.asarray(scores, dtype=np.float64))
    if len(x) < 4 or x[0] == x[-1]:
        return None
    low, high = x[:len(x) // 2], x[len(x) // 2:]
    mean, std, weight = np.array([low.mean(), high.mean()]), np.array([low.std(), high.std()]), np.array([0.5, 0.5])
    for _ in range(iterations):
        std = np.maximum(std, 1e-3 * (x[-1] - x[0]))
        density = weight * np.exp(-0.5 * ((x[:, None] - mean) / std) ** 2) / std
        posterior = density / np.maximum(density.sum(1, keepdims=True), 1e-300)
        weight = posterior.mean(0)
        mean = (posterior * x[:, None]).sum(0) / np.maximum(posterior.sum(0), 1e-12)
        std = np.sqrt((posterior * (x[:, None] - mean) ** 2).sum(0) / np.maximum(posterior.sum(0), 1e-12))
    lo, hi = np.argsort(mean)
    high_posterior = posterior[:, hi]
    above = np.nonzero((x >= mean[lo]) & (high_posterior >= 0.5))[0]
    if not len(above):
        return None
    threshold = float(x[above[0]])
    return MixtureSplit(threshold, float(0.5 * (mean[lo] + threshold)))


def _choose(candidates: list[dict], settings: CapFiltSettings, threshold: Optional[float],
            fallback: Optional[float] = None) -> None:
    """Mark `kept`: at or above `threshold` (None: no threshold), at most top_m of them (best
    first); none left → the best one when `empty` is "best", or "likely" and it reaches
    `fallback` (None: no fallback, as "best")."""
    order = sorted(range(len(candidates)), key=lambda i: -candidates[i]["score"])
    kept = [i for i in order if threshold is None or candidates[i]["score"] >= threshold]
    if settings.top_m:
        kept = kept[:settings.top_m]
    if not kept and order:
        likely = fallback is None or candidates[order[0]]["score"] >= fallback
        if settings.empty == "best" or (settings.empty == "likely" and likely):
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

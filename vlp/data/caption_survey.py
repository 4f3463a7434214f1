"""How often the training captions repeat, from a sample read before training starts.

A labelled set turned into captions ("a photo of a {class}" in a few phrasings) has a
handful of distinct strings for thousands of images; web alt-text almost never repeats.
The recipe differs between the two (`model.text.lock_if_distinct_below`), so the trainer
asks this module first.
"""
from __future__ import annotations

from dataclasses import dataclass

from vlp.data.shard_reader import parsed_samples
from vlp.data.skips import SkipCounter


@dataclass
class CaptionSurvey:
    captions: int  # captions read (every caption of every sample read)
    distinct: int
    shards: int    # shards read from

    @property
    def distinct_share(self) -> float:
        return self.distinct / self.captions if self.captions else 1.0


def survey_captions(urls: list[str], limit: int = 10000, max_shards: int = 16,
                    first_only: bool = False) -> CaptionSurvey:
    """Read up to `limit` captions (each sample's first alone with `first_only`, as
    `data.train_captions: first` trains), an equal part from each of up to `max_shards` shards
    spread evenly over `urls` (a set written class by class still shows its variety). The
    first samples of each, not a random draw, so every rank and a resume decide alike.
    Unreadable samples and broken shards are passed over here: the loader counts them."""
    step = max(1, len(urls) / max_shards)
    chosen = [urls[int(i * step)] for i in range(min(len(urls), max_shards))]
    per_shard = max(1, limit // len(chosen))
    seen: set[str] = set()
    total = 0
    for url in chosen:
        total += _read_captions(url, per_shard, seen, first_only)
    return CaptionSurvey(total, len(seen), len(chosen))


class _Uncounted(SkipCounter):
    """The loader logs and counts each skip when it reads the sample again; not twice."""

    def record(self, reason: str, detail: str) -> None:
        pass


def _read_captions(url: str, limit: int, seen: set[str], first_only: bool) -> int:
    read = 0
    for sample in parsed_samples(url, _Uncounted()):
        captions = sample.captions[:1] if first_only else sample.captions
        seen.update(captions)
        read += len(captions)
        if read >= limit:
            break
    return read

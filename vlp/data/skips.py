"""Counted, logged skips: bad input never crashes a run and never disappears silently."""
from __future__ import annotations

import logging
import tarfile
from collections import Counter

log = logging.getLogger("vlp.data")

# Every reason a sample (or a whole shard) can be skipped.
REASONS = (
    "bad_image",        # image bytes PIL cannot decode
    "image_too_large",  # more pixels than data.max_image_pixels (refused before decoding)
    "missing_image",    # no .jpg/.jpeg/.png/.webp member
    "missing_caption",  # no .txt and no json "captions"
    "empty_caption",    # captions present but all blank
    "bad_text",         # .txt that is not UTF-8
    "bad_json",         # .json that is not UTF-8 JSON object
    "bad_tar",          # truncated or corrupt tar file
    "bad_shard",        # any other error while reading a shard
)

# Per worker: the first few skips of each reason are logged in full, later ones only counted
# (they still reach the batch's `skipped` counts), so a resampled corrupt shard cannot flood
# the log.
_LOG_FIRST = 5


class SkipCounter:
    """Per-worker skip counts; `take()` hands the counts since the last call to a batch."""

    def __init__(self) -> None:
        self.pending: Counter = Counter()
        self.total: Counter = Counter()
        # Off in eval workers that read a tar only to take their share of its samples.
        self.count_shard_errors = True
        self.current_url: str | None = None
        self.flagged_url: str | None = None

    def record(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        self.pending[reason] += 1
        self.total[reason] += 1
        n = self.total[reason]
        if n <= _LOG_FIRST:
            log.warning("skipped (%s): %s", reason, detail)
        elif n == _LOG_FIRST + 1:
            log.warning("skipped (%s): %s; further '%s' skips in this worker are counted "
                        "in batch['skipped'] but not logged", reason, detail, reason)

    def take(self) -> dict[str, int]:
        counts, self.pending = dict(self.pending), Counter()
        return counts

    def begin_shard(self, url: str) -> None:
        self.current_url, self.flagged_url = url, None

    def shard_error(self, detail: str) -> None:
        """One broken tar counts once, however many errors reading it raises."""
        if not self.count_shard_errors or self.flagged_url == self.current_url:
            return
        self.flagged_url = self.current_url
        self.record("bad_tar", f"{self.current_url}: {detail}")

    def handler(self, exn: Exception) -> bool:
        """WebDataset exception handler: classify, count, log, keep going."""
        text = " ".join(str(a) for a in exn.args)
        if isinstance(exn, (tarfile.TarError, EOFError)) or "unexpected end of data" in text:
            self.shard_error(f"{type(exn).__name__}: {text}")
        elif self.count_shard_errors:
            self.record("bad_shard", f"{getattr(self, 'current_url', '?')}: {type(exn).__name__}: {text}")
        return True

"""LiT when the captions repeat: the one recipe choice the trainer makes from the data.

On a labelled set turned into captions (a few phrasings of each class name), fine-tuning
the pretrained text tower lets the contrastive loss push apart "a digit 7" and "the number
7" of two images of 7, each the other's negative; locked, the tower keeps them together
and the image tower learns to meet them (zero-shot +0.3-0.5 on two such sets). On
captions that rarely repeat (the emoji, relations) the locked tower loses retrieval and
name search, so the lock follows the data (docs/benchmarks.md, "Lock when captions repeat").
"""
from __future__ import annotations

from typing import Callable

from vlp.config import Config


def lock_text_if_captions_repeat(cfg: Config, urls: list[str], log: Callable[[str], None]) -> None:
    """Set `model.text.frozen_layers` to "all" when fewer than `lock_if_distinct_below` of
    the training captions are distinct; only a pretrained tower is locked (a tower built
    from dims has nothing worth keeping)."""
    text = cfg.model.text
    threshold = text.lock_if_distinct_below
    if threshold <= 0 or not text.pretrained or text.frozen_layers == "all":
        return
    from vlp.data.caption_survey import survey_captions

    survey = survey_captions(urls, first_only=cfg.data.train_captions == "first")
    share = survey.distinct_share
    verdict = (f"{share:.1%} of {survey.captions} captions sampled from {survey.shards} training "
               f"shard(s) are distinct (model.text.lock_if_distinct_below: {threshold:g})")
    if share < threshold:
        text.frozen_layers = "all"
        log(f"{verdict}: the captions repeat, so the whole text tower is locked (LiT; "
            f"model.text.lock_if_distinct_below=0 keeps frozen_layers as configured)")
    else:
        log(f"{verdict}: the text tower trains above frozen_layers={text.frozen_layers}")

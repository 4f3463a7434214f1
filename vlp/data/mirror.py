"""Mirrored twins: a training image and its mirror image in the same batch, each with the
caption that is true of it ("a dog to the left of an apple" / "a dog to the right of an
apple").

In-batch negatives almost never include the mirror image of a scene, so contrastive
training gets no signal to tell left from right: both towers may treat a scene as a bag of
objects (on the relations development set every scorer was at chance on left/right swaps).
A twin is a hard negative on both sides at once: the mirrored image for the caption, the
mirrored caption for the image. Only captions that name a side are mirrored, by a generic
English rule: "the left" <-> "the right" ("to the left of", "on the right"), "leftmost"
<-> "rightmost". A plain horizontal flip (`data.hflip`) would make such captions false.
"""
from __future__ import annotations

import random
import re

import torch

_SIDE = re.compile(r"\b(the\s+)(left|right)\b|\b(left|right)(most)\b", re.IGNORECASE)
_OTHER = {"left": "right", "right": "left"}


def mirrored_caption(text: str) -> str | None:
    """`text` with its sides swapped, or None when it names no side."""
    def swap(match: re.Match) -> str:
        article, word = (match.group(1), match.group(2)) if match.group(2) else ("", match.group(3))
        other = _OTHER[word.lower()]
        other = other.capitalize() if word[0].isupper() else other
        return article + other + (match.group(4) or "")

    out, n = _SIDE.subn(swap, text)
    return out if n else None


def add_mirrored_twins(images: torch.Tensor, texts: list[str], keys: list[str], share: float,
                       rng: random.Random) -> int:
    """Give up to `share` of the batch's places to mirrored twins of samples whose caption
    names a side, in place: a twin takes the place of a sample from the end of the batch
    that is not itself twinned (the batch keeps its size, so a step costs the same). Its
    key gets "#mirror" so it counts as an image of its own. Returns the number of twins."""
    if share <= 0:
        return 0
    mirrors = {i: m for i, t in enumerate(texts) if (m := mirrored_caption(t)) is not None}
    sources = rng.sample(sorted(mirrors), min(len(mirrors), round(share * len(texts)), len(texts) // 2))
    taken = set(sources)
    places = [i for i in reversed(range(len(texts))) if i not in taken][:len(sources)]
    for source, place in zip(sources, places):
        images[place] = images[source].flip(-1)
        texts[place] = mirrors[source]
        keys[place] = keys[source] + "#mirror"
    return len(sources)

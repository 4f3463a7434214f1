"""Composition-aware hard negative captions (NegCLIP, Yuksekgonul et al. 2023): captions
that keep (almost) every word and break the meaning, so a model that reads a caption as a
bag of words cannot tell them from the truth.

Generic English rules over closed word classes only — determiners, prepositions, spatial
and temporal antonyms — never a data set's vocabulary. A caption is split into noun
phrases at prepositions and conjunctions ("a blue dog | to the left of | a yellow apple");
a phrase's last word is its head, the words between its determiner and its head its
modifiers.

Kinds (each returns None where it does not apply):
- swap_objects:    two noun phrases trade places     → "a yellow apple to the left of a blue dog"
- swap_attributes: two phrases trade modifiers       → "a yellow dog to the left of a blue apple"
- flip_relation:   a relation word becomes its opposite → "a blue dog to the right of a yellow apple"
                   (and its opposite becomes it: "on the left and ... on the right" → "on the
                   right and ... on the left")
- shuffle:         the words in a random order (NegCLIP's word-order negatives)
Every kind but flip_relation keeps the multiset of words (up to a/an agreement).
"""
from __future__ import annotations

import random
import re

KINDS = ("swap_objects", "swap_attributes", "flip_relation", "shuffle")

DETERMINERS = frozenset("a an the this that these those some any each every one two three four "
                        "five several many his her its their my your our no".split())
# Words that end a noun phrase and start the link to the next one.
LINKS = frozenset("in on under above below over behind beside besides near next to with without to "
                  "at by from into onto inside outside between among against along across "
                  "around beneath underneath atop and or while holding wearing left right "
                  "top bottom front back before after of".split())
# Spatial and temporal opposites, both ways (the first pair naming a word wins).
PAIRS = [("left", "right"), ("above", "below"), ("over", "under"), ("on", "under"), ("top", "bottom"),
         ("before", "after"), ("inside", "outside"), ("in", "outside"), ("front", "behind"),
         ("up", "down"), ("with", "without"), ("higher", "lower"), ("upper", "lower"),
         ("beneath", "above"), ("underneath", "above"), ("atop", "under"), ("first", "last")]
OPPOSITES: dict[str, str] = {}
for _one, _other in PAIRS:
    OPPOSITES.setdefault(_one, _other)
    OPPOSITES.setdefault(_other, _one)
WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'\-]*|[^\sA-Za-z0-9]")


def perturb(caption: str, kind: str, rng: random.Random) -> str | None:
    """`caption` made false by `kind`, or None when the rule does not apply (or would give
    back the same words in the same order)."""
    words = WORD.findall(caption)
    if kind not in KINDS:
        raise ValueError(f"unknown hard-negative kind {kind!r}; choose from {KINDS}")
    out = {"swap_objects": _swap_objects, "swap_attributes": _swap_attributes,
           "flip_relation": _flip_relation, "shuffle": _shuffle}[kind](words, rng)
    if out is None:
        return None
    text = _join(_fix_articles(words, out) if kind != "shuffle" else out)
    return None if text.lower() == _join(words).lower() else text


def hard_negative(caption: str, kinds: tuple[str, ...], rng: random.Random) -> str | None:
    """The first of `kinds`, in random order, that applies to `caption`."""
    for kind in rng.sample(list(kinds), len(kinds)):
        negative = perturb(caption, kind, rng)
        if negative is not None:
            return negative
    return None


def noun_phrases(words: list[str]) -> list[tuple[int, int]]:
    """(start, end) word spans of the noun phrases: maximal runs of words with no link word
    or punctuation in them."""
    spans, start = [], None
    for i, word in enumerate(words + ["."]):
        inside = word[0].isalnum() and word.lower() not in LINKS
        if inside and start is None:
            start = i
        elif not inside and start is not None:
            if any(w.lower() not in DETERMINERS for w in words[start:i]):  # not a lone "the"
                spans.append((start, i))
            start = None
    return spans


def _modifiers(words: list[str], span: tuple[int, int]) -> tuple[int, int]:
    """The span of a phrase's modifiers: after its determiners, before its head."""
    start, end = span
    while start < end - 1 and words[start].lower() in DETERMINERS:
        start += 1
    return start, end - 1


def _swap_objects(words: list[str], rng: random.Random) -> list[str] | None:
    spans = noun_phrases(words)
    if len(spans) < 2:
        return None
    (a0, a1), (b0, b1) = sorted(rng.sample(spans, 2))
    return words[:a0] + words[b0:b1] + words[a1:b0] + words[a0:a1] + words[b1:]


def _swap_attributes(words: list[str], rng: random.Random) -> list[str] | None:
    with_modifiers = [m for m in (_modifiers(words, s) for s in noun_phrases(words)) if m[1] > m[0]]
    if len(with_modifiers) < 2:
        return None
    (a0, a1), (b0, b1) = sorted(rng.sample(with_modifiers, 2))
    if [w.lower() for w in words[a0:a1]] == [w.lower() for w in words[b0:b1]]:
        return None
    return words[:a0] + words[b0:b1] + words[a1:b0] + words[a0:a1] + words[b1:]


def _flip_relation(words: list[str], rng: random.Random) -> list[str] | None:
    lower = [w.lower() for w in words]
    places = [i for i, w in enumerate(lower) if w in OPPOSITES]
    if not places:
        return None
    # Where the caption names both sides of a pair ("a dog on the left and an apple on the
    # right"), that pair flips, both sides together: flipping one word alone says "on the
    # right ... on the right", a caption no one writes, which a model can reject without
    # reading the relation.
    both_sides = [i for i in places
                  if OPPOSITES[lower[i]] in lower and OPPOSITES[OPPOSITES[lower[i]]] == lower[i]]
    word = lower[rng.choice(both_sides or places)]
    swap = {word: OPPOSITES[word], OPPOSITES[word]: word} if both_sides else {word: OPPOSITES[word]}
    out: list[str] = []
    for original, low in zip(words, lower):
        out += swap[low].split() if low in swap else [original]
    return out


def _shuffle(words: list[str], rng: random.Random) -> list[str] | None:
    alnum = [w for w in words if w[0].isalnum()]
    if len(set(w.lower() for w in alnum)) < 2:
        return None
    shuffled = alnum[:]
    rng.shuffle(shuffled)
    # A short caption can come back in its own order; rotated by one it cannot (it has two
    # different words).
    return shuffled if shuffled != alnum else shuffled[1:] + shuffled[:1]


def _fix_articles(before: list[str], after: list[str]) -> list[str]:
    """a/an by the next word's first letter (the usual written rule), where the word after
    the article changed and is part of its noun phrase: "a" can also be a word of its own
    ("the letter a in a font")."""
    out = list(after)
    for i, word in enumerate(out[:-1]):
        following = out[i + 1]
        is_article = following[0].isalnum() and following.lower() not in LINKS
        if word.lower() in ("a", "an") and is_article and (i + 1 >= len(before) or before[i + 1] != following):
            wanted = "an" if out[i + 1][0].lower() in "aeiou" else "a"
            out[i] = wanted.capitalize() if word[0].isupper() else wanted
    return out


def _join(words: list[str]) -> str:
    text = " ".join(words)
    return re.sub(r" ([,.;:!?])", r"\1", text)


def negatives_for_batch(captions: list[str], fraction: float, kinds: tuple[str, ...],
                        seed: str) -> tuple[list[int], list[str]]:
    """Hard negatives for about `fraction` of a batch's captions: (index of the caption each
    negative was made from, the negatives). Deterministic for a seed (the trainer's step and
    rank), so a resumed run makes the same ones."""
    rng = random.Random(seed)
    owners, negatives = [], []
    for index, caption in enumerate(captions):
        if rng.random() >= fraction:
            continue
        negative = hard_negative(caption, kinds, rng)
        if negative is not None:
            owners.append(index)
            negatives.append(negative)
    return owners, negatives

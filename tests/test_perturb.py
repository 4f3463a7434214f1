"""Hard negative captions: each kind breaks the meaning, keeps the words where it should,
and uses only English function words (no data set vocabulary)."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from vlp.data.perturb import KINDS, WORD, hard_negative, perturb

CAPTIONS = ["a blue dog to the left of a yellow apple", "an apple above a dog",
            "grinning face with big eyes", "the letter g in a bold serif font",
            "a small red car behind a large green tree", "two cats on a mat"]


def words(text: str) -> Counter:
    """Word multiset, with a/an counted as one article."""
    return Counter("a" if w.lower() in ("a", "an") else w.lower() for w in WORD.findall(text))


@pytest.mark.parametrize("kind", ["swap_objects", "swap_attributes", "shuffle"])
def test_word_keeping_kinds_change_the_caption_and_keep_its_words(kind):
    rng = random.Random(0)
    applied = 0
    for caption in CAPTIONS:
        negative = perturb(caption, kind, rng)
        if negative is None:
            continue
        applied += 1
        assert negative != caption and words(negative) == words(caption), (caption, negative)
    assert applied >= 4


def test_the_rules_on_known_captions():
    rng = random.Random(0)
    assert perturb("a blue dog to the left of a yellow apple", "swap_objects", rng) == \
        "a yellow apple to the left of a blue dog"
    assert perturb("a blue dog to the left of a yellow apple", "swap_attributes", rng) == \
        "a yellow dog to the left of a blue apple"
    assert perturb("a blue dog to the left of a yellow apple", "flip_relation", rng) == \
        "a blue dog to the right of a yellow apple"
    assert perturb("an apple above a dog", "swap_objects", rng) == "a dog above an apple"  # a/an agree
    assert perturb("the lowercase letter a in a font", "flip_relation", rng) == \
        "the lowercase letter a outside a font"  # "a" as a word of its own is left alone


def test_flip_relation_changes_exactly_one_relation_word():
    rng = random.Random(1)
    before, after = "a cat on a mat under a lamp".split(), perturb("a cat on a mat under a lamp", "flip_relation", rng).split()
    changed = [(b, a) for b, a in zip(before, after) if b != a]
    assert len(before) == len(after) and len(changed) == 1 and changed[0] in (("on", "under"), ("under", "over"))


def test_flip_relation_swaps_both_sides_of_a_caption_that_names_both():
    for seed in range(6):
        rng = random.Random(seed)
        assert perturb("a dog on the left and an apple on the right", "flip_relation", rng) == \
            "a dog on the right and an apple on the left"
        assert perturb("a cat at the top and a cyclone at the bottom", "flip_relation", rng) == \
            "a cat at the bottom and a cyclone at the top"


def test_inapplicable_rules_give_none_and_hard_negative_tries_the_others():
    rng = random.Random(0)
    assert perturb("red apple", "swap_objects", rng) is None
    assert perturb("red apple", "flip_relation", rng) is None
    assert perturb("apple", "shuffle", rng) is None
    assert hard_negative("red apple", KINDS, rng) == "apple red"
    assert hard_negative("apple", KINDS, rng) is None
    with pytest.raises(ValueError, match="unknown hard-negative kind"):
        perturb("a cat", "negate", rng)


def test_deterministic_for_a_seeded_rng():
    a = [hard_negative(c, KINDS, random.Random(7)) for c in CAPTIONS]
    b = [hard_negative(c, KINDS, random.Random(7)) for c in CAPTIONS]
    assert a == b

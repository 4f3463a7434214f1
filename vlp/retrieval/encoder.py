"""The model as retrieval sees it: bytes and strings in, numpy embeddings out."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from vlp.data.images import ImageTooLarge, decode_image, eval_transform
from vlp.data.text import tokenize


class Encoder:
    """Wraps a model directory: global and FILIP-token embeddings, ITM scores.

    Calls are serialized by a lock: torch already uses every core inside one forward, and
    the service batches concurrent queries before they get here.
    """

    def __init__(self, model_dir: str | Path, threads: Optional[int] = None):
        from vlp.model import load_model_dir  # heavy import, only when a model is needed

        self.model_dir = str(model_dir)
        self.model, self.cfg, self.tokenizer = load_model_dir(model_dir)
        self.model.eval()
        self.transform = eval_transform(self.cfg.data)
        self.max_len = self.cfg.data.max_len
        self.lock = threading.Lock()
        self._decoder = ThreadPoolExecutor(2)
        if threads:
            torch.set_num_threads(threads)

    # ----------------------------------------------------------------- inputs
    def decode(self, image_bytes: bytes, max_pixels: Optional[int] = None) -> torch.Tensor:
        """Bytes → normalized [3, S, S]. Raises ImageTooLarge over the pixel budget
        (`max_pixels`, default the model config's `data.max_image_pixels`), checked before
        decoding, and ValueError on undecodable bytes."""
        budget = self.cfg.data.max_image_pixels if max_pixels is None else max_pixels
        try:
            img = decode_image(image_bytes, self.cfg.data.image_size, budget)
        except ImageTooLarge:
            raise
        except Exception as err:  # PIL raises many types for bad bytes
            raise ValueError(f"cannot decode image: {err}") from err
        return self.transform(img)

    def decode_many(self, images: list[bytes]) -> list[torch.Tensor | ValueError]:
        """Decode in two threads (PIL releases the GIL); the error in place of bad bytes."""
        def safe(data: bytes) -> torch.Tensor | ValueError:
            try:
                return self.decode(data)
            except ValueError as err:
                return err
        return list(self._decoder.map(safe, images))

    def tokens(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return tokenize(self.tokenizer, texts, self.max_len)

    # ----------------------------------------------------------------- embeddings
    @torch.inference_mode()
    def image_embeddings(self, images: torch.Tensor) -> np.ndarray:
        with self.lock:
            return self.model.encode_image(images).float().numpy()

    @torch.inference_mode()
    def text_embeddings(self, texts: list[str]) -> np.ndarray:
        tok = self.tokens(texts)
        with self.lock:
            return self.model.encode_text(tok["input_ids"], tok["attention_mask"]).float().numpy()

    @torch.inference_mode()
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        with self.lock:
            return self.model.encode_image_tokens(images).float()

    @torch.inference_mode()
    def text_tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokens(texts)
        with self.lock:
            out = self.model.encode_text_tokens(tok["input_ids"], tok["attention_mask"]).float()
        return out, tok["attention_mask"]

    @torch.inference_mode()
    def image_and_tokens(self, images: torch.Tensor, n_tokens: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Global embeddings plus, when n_tokens != 0, the kept FILIP tokens (fp16)."""
        emb = self.image_embeddings(images)
        if n_tokens == 0:
            return emb, None
        return emb, select_tokens(self.image_tokens(images), n_tokens).half().numpy()

    # ----------------------------------------------------------------- scores
    @torch.inference_mode()
    def filip_text_to_image(self, image_tokens: torch.Tensor, text: str) -> torch.Tensor:
        """FILIP t2i score of one text against each of `image_tokens` [K, T, D] → [K]."""
        text_tok, mask = self.text_tokens([text])
        with self.lock:
            _, t2i = self.model.filip_scores(image_tokens.float(), text_tok, mask)
        return t2i[:, 0].float()

    @torch.inference_mode()
    def filip_image_to_text(self, image_tokens: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """FILIP i2t score of one image [1, T, D] against each text → [len(texts)]."""
        text_tok, mask = self.text_tokens(texts)
        with self.lock:
            i2t, _ = self.model.filip_scores(image_tokens.float(), text_tok, mask)
        return i2t[0].float()

    @torch.inference_mode()
    def filip_image_to_image(self, query_tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Image query: its tokens play the text side (every token real) → [K]."""
        mask = torch.ones(query_tokens.shape[:2], dtype=torch.long)
        with self.lock:
            _, t2i = self.model.filip_scores(image_tokens.float(), query_tokens.float(), mask)
        return t2i[:, 0].float()

    @torch.inference_mode()
    def image_states(self, images: torch.Tensor) -> torch.Tensor:
        with self.lock:
            return self.model.encode_image_states(images)

    @torch.inference_mode()
    def itm(self, texts: list[str], image_states: torch.Tensor) -> torch.Tensor:
        """Match probability of each (texts[i], image_states[i]) pair → [K].

        A text repeated across pairs (one query against K candidates) runs the text-only
        layers once; only the fusion layers see every pair."""
        position = {text: i for i, text in enumerate(dict.fromkeys(texts))}
        states, mask = self.text_states(list(position))
        at = torch.tensor([position[text] for text in texts])
        return self.itm_from_states(states[at], mask[at], image_states)

    @torch.inference_mode()
    def text_states(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The text tower's text-only hidden states (before the fusion layers) and mask,
        cut to the longest text: padding past it changes no real token's output."""
        tok = self.tokens(texts)
        length = int(tok["attention_mask"].sum(1).max())
        ids, mask = tok["input_ids"][:, :length], tok["attention_mask"][:, :length]
        with self.lock:
            return self.model.encode_text_states(ids, mask), mask

    @torch.inference_mode()
    def itm_from_states(self, text_states: torch.Tensor, mask: torch.Tensor,
                        image_states: torch.Tensor) -> torch.Tensor:
        """`VLPModel.itm_scores` continued from `text_states`: fusion layers + ITM head."""
        length = int(mask.sum(1).max())
        with self.lock:
            return self.model.itm_scores(None, mask[:, :length], image_states=image_states,
                                         text_states=text_states[:, :length])


def select_tokens(tokens: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep `keep` of each image's N tokens by farthest-point sampling in cosine space.

    FILIP takes a max over image tokens, so the kept set should cover every token: each
    dropped token then has a kept neighbour and the max barely moves. Background patches
    are near-duplicates of each other and go first. keep < 0 or >= N keeps all.
    """
    b, n, _ = tokens.shape
    if keep < 0 or keep >= n:
        return tokens
    mean = torch.nn.functional.normalize(tokens.mean(1), dim=-1)
    first = (tokens @ mean.unsqueeze(-1)).squeeze(-1).argmax(1)  # the most typical token
    chosen = [first]
    rows = torch.arange(b)
    closest = (tokens @ tokens[rows, first].unsqueeze(-1)).squeeze(-1)
    for _ in range(keep - 1):
        nxt = closest.argmin(1)
        chosen.append(nxt)
        closest = torch.maximum(closest, (tokens @ tokens[rows, nxt].unsqueeze(-1)).squeeze(-1))
    index = torch.stack(chosen, 1)
    return tokens[rows.unsqueeze(1), index]

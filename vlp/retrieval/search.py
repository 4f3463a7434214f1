"""Search API over a built index: text→image, image→image, raw embeddings; FILIP/ITM rerank."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from vlp.metrics import rerank_score
from vlp.retrieval import index as faiss_index
from vlp.retrieval.encoder import Encoder
from vlp.retrieval.shards import IMAGE_MIME, read_member
from vlp.retrieval.store import ItemStore

log = logging.getLogger(__name__)
RERANKERS = ("filip", "itm")
# Candidates fetched from the index before a rerank (ALBEF/BLIP rerank the ITC top-k).
DEFAULT_RERANK_CANDIDATES = 32


class QueryError(ValueError):
    """A query the searcher cannot answer (wrong dims, rerank without the needed data)."""


class StoreError(RuntimeError):
    """The index's own data cannot be read (a shard missing, cut short or corrupt): a fault
    of the server's store, not of the query. The message names the shard relative to the
    shard folder, never the server's absolute paths."""


@dataclass
class Hit:
    """`score` orders the results: the index score (cosine), or after a rerank the
    combination of the two (`vlp.metrics.rerank_score`: s_itc·cos + log p_itm, or
    s_itc·cos + s_filip·filip); `rerank_score` is the reranker's own (p_itm, or FILIP)."""
    id: int
    score: float
    key: str
    caption: str
    index_score: float
    rerank_score: Optional[float] = None

    def as_dict(self) -> dict:
        out = {"id": self.id, "score": round(self.score, 6), "key": self.key,
               "caption": self.caption, "index_score": round(self.index_score, 6)}
        if self.rerank_score is not None:
            out["rerank_score"] = round(self.rerank_score, 6)
        return out


class Searcher:
    """Loads index + items once; the model loads on the first query that needs it."""

    def __init__(self, index_dir: str | Path, encoder: Optional[Encoder] = None,
                 mmap: Optional[bool] = None, rerank_candidates: int = DEFAULT_RERANK_CANDIDATES):
        self.dir = Path(index_dir)
        self.index, self.manifest = faiss_index.load_index(self.dir, mmap=mmap)
        self.items = ItemStore(self.dir)
        self._encoder = encoder
        self.rerank_candidates = rerank_candidates
        self.shard_ends = self.items.shard_ends()
        self.shard_root = os.path.commonpath([os.path.dirname(s) for s in self.shard_ends]) if self.shard_ends else ""

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = Encoder(self.manifest.model)
        return self._encoder

    @property
    def dims(self) -> int:
        return self.manifest.dims

    # ----------------------------------------------------------------- raw search
    def search_vectors(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) [n, k]; id -1 pads when the index holds fewer than k items."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dims:
            raise QueryError(f"embedding has {queries.shape[1]} dims, the index has {self.dims}")
        return self.index.search(queries, k)

    def hits(self, scores: np.ndarray, ids: np.ndarray, rerank_scores: Optional[np.ndarray] = None,
             combined: Optional[np.ndarray] = None) -> list[Hit]:
        """Hits in the given order; `scores` are the index's; after a rerank, the reranker's
        own scores and the `combined` ones they are ranked by."""
        out = []
        for j, (score, item) in enumerate(zip(scores, ids)):
            if item < 0:
                continue
            row = self.items.row(item)
            captions = self.items.captions(row)
            rerank = None if rerank_scores is None else float(rerank_scores[j])
            ranked_by = float(score) if combined is None else float(combined[j])
            out.append(Hit(int(item), ranked_by, self.items.keys[row],
                           captions[0] if captions else "", float(score), rerank))
        return out

    # ----------------------------------------------------------------- queries
    def search_embedding(self, embedding: np.ndarray, k: int) -> list[Hit]:
        # Normalized in float64: a client's huge-but-finite numbers must not overflow float32.
        vec = normalize(np.asarray(embedding, dtype=np.float64).reshape(1, -1)).astype(np.float32)
        scores, ids = self.search_vectors(vec, k)
        return self.hits(scores[0], ids[0])

    def search_text(self, text: str, k: int, rerank: Optional[str] = None,
                    embedding: Optional[np.ndarray] = None) -> list[Hit]:
        vec = embedding if embedding is not None else self.encoder.text_embeddings([text])[0]
        return self._search_and_rerank(vec, k, rerank, text=text)

    def search_image(self, image: torch.Tensor, k: int, rerank: Optional[str] = None,
                     embedding: Optional[np.ndarray] = None) -> list[Hit]:
        """`image`: a normalized [3, S, S] tensor (Encoder.decode)."""
        if rerank == "itm":
            raise QueryError("rerank 'itm' scores a text against images; it needs a text query")
        vec = embedding if embedding is not None else self.encoder.image_embeddings(image[None])[0]
        return self._search_and_rerank(vec, k, rerank, image=image)

    def _search_and_rerank(self, vec: np.ndarray, k: int, rerank: Optional[str],
                           text: Optional[str] = None, image: Optional[torch.Tensor] = None) -> list[Hit]:
        if rerank is None:
            scores, ids = self.search_vectors(vec, k)
            return self.hits(scores[0], ids[0])
        if rerank not in RERANKERS:
            raise QueryError(f"unknown rerank '{rerank}'; choose one of {', '.join(RERANKERS)}")
        if not self.can_rerank(rerank):
            raise QueryError(f"rerank '{rerank}' is not available: the model has no "
                             f"{'ITM head (trained with loss.itm: 0)' if rerank == 'itm' else 'FILIP heads'}")
        scores, ids = self.search_vectors(vec, max(k, self.rerank_candidates))
        keep = ids[0] >= 0
        index_scores, ids = scores[0][keep], ids[0][keep]
        rows = self.items.rows(ids)
        model = self.encoder.model
        if rerank == "filip":
            new = self.filip_scores(rows, text=text, image=image)
            combined = rerank_score(index_scores, new, float(model.logit_scale), "filip",
                                    float(model.filip_logit_scale))
        else:
            new = self.itm_scores(rows, text)
            combined = rerank_score(index_scores, new, float(model.logit_scale))
        order = np.argsort(-combined, kind="stable")[:k]
        return self.hits(index_scores[order], ids[order], new[order], combined[order])

    # ----------------------------------------------------------------- rerank scores
    def can_rerank(self, rerank: str) -> bool:
        """Whether the model has the heads; FILIP also needs stored tokens (checked on use)."""
        model = self.encoder.model
        return model.has_itm if rerank == "itm" else model.has_filip
    def filip_scores(self, rows: np.ndarray, text: Optional[str] = None,
                     image: Optional[torch.Tensor] = None) -> np.ndarray:
        if self.items.tokens is None:
            raise QueryError("rerank 'filip' needs stored image tokens; rebuild with --filip-tokens > 0 or -1")
        tokens = torch.from_numpy(np.asarray(self.items.tokens[np.sort(rows)]))
        # Rows were read sorted (faster on a memory map); put them back in candidate order.
        tokens = tokens[torch.from_numpy(np.argsort(np.argsort(rows)))]
        if text is not None:
            return self.encoder.filip_text_to_image(tokens, text).numpy()
        query_tokens = self.encoder.image_tokens(image[None])
        return self.encoder.filip_image_to_image(query_tokens, tokens).numpy()

    def itm_scores(self, rows: np.ndarray, text: str) -> np.ndarray:
        images = torch.stack([self.stored_image(int(r)) for r in rows])
        states = self.encoder.image_states(images)
        return self.encoder.itm([text] * len(rows), states).numpy()

    # ----------------------------------------------------------------- items
    def image_bytes(self, row: int) -> bytes:
        item = self.items.table.slice(row, 1).select(["shard", "key", "image_offset", "image_size"]).to_pylist()[0]
        try:
            return read_member(item["shard"], item["image_offset"], item["image_size"])
        except OSError as err:
            problem = self.shard_problem(item["shard"]) or type(err).__name__
            log.error("image of %s unreadable from %s: %s", item["key"], item["shard"], err)
            raise StoreError(f"shard '{self.shard_name(item['shard'])}' is unreadable ({problem}); "
                             f"item {item['key']} cannot be read") from None

    def stored_image(self, row: int) -> torch.Tensor:
        """An indexed image, decoded like a query image; StoreError when it cannot be."""
        data = self.image_bytes(row)
        try:
            return self.encoder.decode(data)
        except ValueError as err:
            raise StoreError(f"item {self.items.keys[row]} in shard "
                             f"'{self.shard_name(self.items.item(row)['shard'])}' does not decode: {err}") from None

    def shard_name(self, shard: str) -> str:
        return os.path.relpath(shard, self.shard_root) if self.shard_root else os.path.basename(shard)

    def shard_problem(self, shard: str) -> Optional[str]:
        """Why a shard cannot serve its items' images, or None."""
        try:
            size = os.stat(shard).st_size
        except FileNotFoundError:
            return "missing"
        except OSError as err:
            return f"not accessible: {err.strerror}"
        needed = self.shard_ends[shard]
        return None if size >= needed else f"cut short: {size} bytes, its items need {needed}"

    def unreadable_shards(self) -> dict[str, str]:
        """{shard name: problem} for each shard the items live in that cannot serve them."""
        found = {shard: self.shard_problem(shard) for shard in self.shard_ends}
        return {self.shard_name(shard): problem for shard, problem in found.items() if problem}

    def public_item(self, row: int) -> dict:
        """An item's metadata with its shard named relative to the shard folder."""
        record = self.items.item(row)
        record["shard"] = self.shard_name(record["shard"])
        return record

    def image_mime(self, row: int) -> str:
        member = self.items.item(row)["image_member"]
        return IMAGE_MIME.get(member.rsplit(".", 1)[-1].lower(), "application/octet-stream")


def normalize(x: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(x)):
        raise QueryError("embedding must be finite and non-zero")
    scale = np.abs(x).max(axis=1, keepdims=True)  # scaled first, so the norm cannot overflow
    if np.any(scale == 0):
        raise QueryError("embedding must be finite and non-zero")
    x = x / scale
    return x / np.linalg.norm(x, axis=1, keepdims=True)

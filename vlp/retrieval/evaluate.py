"""Retrieval recall of an index over its own labelled pairs (each image and its captions).

Reports t2i and i2t R@1/5/10 for: exact search, the index (i2t goes through a caption index
built by the same rules), and the index's top candidates reranked by FILIP and by ITM.
Unretrieved pairs score -inf, so a pair the index misses counts as a miss at every k.
"""
from __future__ import annotations

import logging
import numpy as np
import torch
from tqdm import tqdm

from vlp.metrics import retrieval_recall
from vlp.retrieval import index as faiss_index
from vlp.retrieval.search import Searcher

log = logging.getLogger(__name__)
K = 10


def evaluate(searcher: Searcher, candidates: int = 16, limit: int = 5000,
             rerank: tuple[str, ...] = ("filip", "itm"), batch_size: int = 64) -> dict[str, dict[str, float]]:
    items = searcher.items
    if len(items) > limit:
        raise ValueError(f"the index holds {len(items)} images, more than --eval-limit {limit}; "
                         f"build an index over the evaluation shards (or raise the limit)")
    image_emb = np.asarray(items.image_emb, dtype=np.float32)
    text_emb = np.asarray(items.text_emb, dtype=np.float32)
    owner = torch.from_numpy(items.text_owner)
    if len(text_emb) == 0:
        raise ValueError("the index stores no caption embeddings; nothing to evaluate against")
    report = {"exact": retrieval_recall(torch.from_numpy(image_emb @ text_emb.T), owner)}

    t2i_scores, t2i_ids = searcher.search_vectors(text_emb, K if not rerank else max(K, candidates))
    t2i_rows = _rows(searcher, t2i_ids)
    text_index, text_manifest = faiss_index.build_tuned_index(
        text_emb, np.arange(len(text_emb)), faiss_index.held_out_queries(image_emb), model="")
    i2t_scores, i2t_rows = text_index.search(image_emb, K if not rerank else max(K, candidates))
    report["index"] = _recall(len(image_emb), len(text_emb), owner, t2i_rows[:, :K], t2i_scores[:, :K],
                              i2t_rows[:, :K], i2t_scores[:, :K])
    report["index"]["caption_index"] = f"{text_manifest.factory} {text_manifest.search_params}"

    texts = [c for row in range(len(items)) for c in items.captions(row)]
    for name in rerank:
        if not searcher.can_rerank(name) or (name == "filip" and items.tokens is None):
            report[f"index+{name}"] = {"skipped": f"the model or index cannot {name}-rerank"}
            log.warning("eval: %s rerank skipped (no %s)", name,
                        "ITM head" if name == "itm" else "FILIP heads or stored image tokens")
            continue
        t2i_new, i2t_new = _rerank(searcher, name, texts, t2i_rows[:, :candidates],
                                   i2t_rows[:, :candidates], batch_size)
        # Ranked as the service ranks: index score + rerank score.
        report[f"index+{name}"] = _recall(len(image_emb), len(text_emb), owner,
                                          t2i_rows[:, :candidates], t2i_scores[:, :candidates] + t2i_new,
                                          i2t_rows[:, :candidates], i2t_scores[:, :candidates] + i2t_new)
    return report


def _rows(searcher: Searcher, ids: np.ndarray) -> np.ndarray:
    rows = np.full(ids.shape, -1, dtype=np.int64)
    valid = ids >= 0
    rows[valid] = searcher.items.rows(ids[valid])
    return rows


def _recall(n_images: int, n_texts: int, owner: torch.Tensor, t2i_rows, t2i_scores,
            i2t_rows, i2t_scores) -> dict[str, float]:
    """t2i recall from a matrix filled by the text queries' hits, i2t from one filled by the
    image queries' hits (retrieval_recall reads t2i by column, i2t by row); rest -inf."""
    t2i = _fill(n_images, n_texts, t2i_rows, t2i_scores, by_column=True)
    i2t = _fill(n_images, n_texts, i2t_rows, i2t_scores, by_column=False)
    out = {k: v for k, v in retrieval_recall(t2i, owner).items() if k.startswith("t2i")}
    out.update({k: v for k, v in retrieval_recall(i2t, owner).items() if k.startswith("i2t")})
    return out


def _fill(n_images: int, n_texts: int, hit_rows: np.ndarray, hit_scores, by_column: bool) -> torch.Tensor:
    scores = torch.full((n_images, n_texts), float("-inf"))
    queries = np.repeat(np.arange(len(hit_rows)), hit_rows.shape[1])
    found = hit_rows.ravel()
    ok = found >= 0
    values = torch.from_numpy(np.asarray(hit_scores, np.float32).ravel()[ok])
    if by_column:
        scores[found[ok], queries[ok]] = values
    else:
        scores[queries[ok], found[ok]] = values
    return scores


@torch.inference_mode()
def _rerank(searcher: Searcher, name: str, texts: list[str], t2i_rows: np.ndarray,
            i2t_rows: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rerank scores for every (query, candidate) cell; -inf where no candidate."""
    enc = searcher.encoder
    if name == "filip":
        if searcher.items.tokens is None:
            raise ValueError("FILIP rerank needs stored image tokens (build with --filip-tokens != 0)")
        image_side = torch.from_numpy(np.asarray(searcher.items.tokens, dtype=np.float32))
        parts = [enc.text_tokens(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
        text_tok, text_mask = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

        # filip_scores gives a full [images, texts] matrix, so group pairs by their query.
        def t2i(texts_q, rows):
            return _per_query(texts_q, rows, lambda j, r: enc.model.filip_scores(
                image_side[r], text_tok[j:j + 1], text_mask[j:j + 1])[1][:, 0])

        def i2t(images_q, rows):
            return _per_query(images_q, rows, lambda i, r: enc.model.filip_scores(
                image_side[i:i + 1], text_tok[r], text_mask[r])[0][0])
    elif name == "itm":
        states = []
        for start in tqdm(range(0, len(searcher.items), batch_size), desc="image states", leave=False):
            rows = range(start, min(start + batch_size, len(searcher.items)))
            states.append(enc.image_states(torch.stack([searcher.stored_image(r) for r in rows])))
        image_side = torch.cat(states)
        # Each text meets ~`candidates` images in each direction: its text-only layers run
        # once here, and only the fusion layers run per pair.
        text_side, text_mask = _text_states(enc, texts, batch_size)

        def t2i(texts_q, rows):
            return enc.itm_from_states(text_side[texts_q], text_mask[texts_q], image_side[rows])

        def i2t(images_q, rows):
            return enc.itm_from_states(text_side[rows], text_mask[rows], image_side[images_q])
    else:
        raise ValueError(f"unknown rerank '{name}' (filip, itm)")
    return (_score_cells(t2i_rows, t2i, batch_size, f"{name} t2i"),
            _score_cells(i2t_rows, i2t, batch_size, f"{name} i2t"))


def _text_states(enc, texts: list[str], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-only states of every text, batches zero-padded to a common length (mask 0)."""
    parts = [enc.text_states(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
    length = max(states.shape[1] for states, _ in parts)
    return (torch.cat([torch.nn.functional.pad(states, (0, 0, 0, length - states.shape[1])) for states, _ in parts]),
            torch.cat([torch.nn.functional.pad(mask, (0, length - mask.shape[1])) for _, mask in parts]))


def _per_query(queries: torch.Tensor, rows: torch.Tensor, score) -> torch.Tensor:
    out = torch.empty(len(rows))
    for q in queries.unique().tolist():
        at = queries == q
        out[at] = score(q, rows[at]).float()
    return out


def _score_cells(candidates: np.ndarray, score_pairs, batch_size: int, desc: str) -> np.ndarray:
    """Score every valid (query, candidate) cell, `batch_size` pairs per model call."""
    out = np.full(candidates.shape, -np.inf, dtype=np.float32)
    queries, slots = np.nonzero(candidates >= 0)
    for start in tqdm(range(0, len(queries), batch_size), desc=desc, leave=False, mininterval=5):
        q, s = queries[start:start + batch_size], slots[start:start + batch_size]
        scores = score_pairs(torch.from_numpy(q), torch.from_numpy(candidates[q, s]))
        out[q, s] = scores.float().numpy()
    return out

"""From finished embedding chunks to a searchable index directory."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from vlp.retrieval import index as faiss_index
from vlp.retrieval import store

log = logging.getLogger(__name__)
# Held-out queries: half tune the index, the other half measure the recall it claims.
TUNING_QUERIES = 2000


def build_index_dir(index_dir: Path, model: str, factory: Optional[str] = None,
                    memory_budget_bytes: Optional[int] = None, merge_from: Iterable[Path] = (),
                    target_recall: float = faiss_index.TARGET_RECALL, seed: int = 0,
                    tuning_margin: float = faiss_index.TUNING_MARGIN) -> faiss_index.Manifest:
    """Merge chunks, choose/train/tune the index, write it and then its manifest.

    Tuning queries are caption embeddings (the real text→image query distribution, and not
    part of the index); an index without captions tunes on a sample of its own vectors.
    """
    index_dir = Path(index_dir)
    _check_one_model(index_dir, [Path(d) for d in merge_from])
    count = store.merge_chunks(index_dir, merge_from)
    items = store.ItemStore(index_dir)
    vectors = np.asarray(items.image_emb, dtype=np.float32)
    texts = items.text_emb
    if len(texts):
        rows = np.random.default_rng(seed + 1).choice(len(texts), min(TUNING_QUERIES, len(texts)), replace=False)
        queries = np.asarray(texts[np.sort(rows)], dtype=np.float32)
    else:
        queries = faiss_index.held_out_queries(vectors, TUNING_QUERIES, seed + 1)
    index, manifest = faiss_index.build_tuned_index(
        vectors, items.ids, queries, model=model, factory=factory,
        memory_budget_bytes=memory_budget_bytes, target=target_recall, margin=tuning_margin, seed=seed)
    manifest.extra.update({"embedding_dtype": str(items.image_emb.dtype), "texts": int(len(texts)),
                           "image_tokens": list(items.tokens.shape[1:]) if items.tokens is not None else None})
    faiss_index.save_index(index, index_dir)
    manifest.write(index_dir)  # last: a manifest means the directory is complete
    log.info("index: %d items, %s, %s, recall@10 %.3f", count, manifest.factory,
             manifest.search_params, manifest.recall_at_10)
    return manifest


def _check_one_model(index_dir: Path, merge_from: list[Path]) -> None:
    """The index is written into `index_dir`, which must be ours (see refuse_foreign), and
    all chunks merged into it must come from one model."""
    from vlp.retrieval.embed import BUILD_FILE, refuse_foreign

    refuse_foreign(index_dir)
    hashes = {}
    for directory in [index_dir, *merge_from]:
        build = directory / BUILD_FILE
        if build.is_file():
            hashes[str(directory)] = json.loads(build.read_text()).get("model_hash")
    if len(set(hashes.values())) > 1:
        raise ValueError("chunks of different models cannot be merged: "
                         + ", ".join(f"{d} (model hash {str(h)[:12]})" for d, h in hashes.items()))

"""tools/bench_names.py: an item's own short name as a query, found in the top k or not."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from test_retrieval_support import encoder, tiny_index
from vlp.retrieval.search import Searcher

_spec = importlib.util.spec_from_file_location("bench_names", Path(__file__).resolve().parent.parent / "tools/bench_names.py")
bench_names = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_names)


@pytest.fixture(scope="module")
def searcher() -> Searcher:
    return Searcher(tiny_index(), encoder=encoder())


def test_items_sharing_a_name_form_one_query(searcher):
    # json "n" is a number, not a name: the first caption ("a red circle") names the item.
    names = bench_names.short_names(searcher, "n", max_words=3)
    assert sum(len(ids) for ids in names.values()) == len(searcher.items)
    assert all(len(name.split()) == 3 and name.startswith("a ") for name in names)
    assert len(names) < len(searcher.items)  # colours x shapes repeat over 30 images
    assert bench_names.short_names(searcher, "n", max_words=2) == {}


def test_hit_rates_match_an_exact_search(searcher):
    names = bench_names.short_names(searcher, None, max_words=3)
    k = 3
    report = bench_names.name_recall(searcher, names, k)
    images = np.asarray(searcher.items.image_emb, np.float32)
    hits1, hitsk = [], []
    for name in sorted(names):
        scores = images @ np.asarray(encoder().text_embeddings([name])[0], np.float32)
        top = [int(searcher.items.ids[r]) for r in np.argsort(-scores)[:k]]
        hits1.append(top[0] in names[name])
        hitsk.append(any(i in names[name] for i in top))
    assert report["n"] == len(names)
    assert report["top1"] == pytest.approx(np.mean(hits1))
    assert report["topk"] == pytest.approx(np.mean(hitsk))
    assert len(report["misses"]) == len(names) - sum(hitsk)


def test_an_index_without_short_names_is_a_clear_error(capsys):
    with pytest.raises(SystemExit, match="no item .* has a name of at most 1 words"):
        bench_names.main(["--index", str(tiny_index()), "--max-words", "1"])

"""FAISS index choice, round trip, tuning and the recall a manifest claims (no model needed)."""
from __future__ import annotations

import numpy as np
import pytest

from vlp.retrieval import index as I


def clustered(n: int, dims: int, seed: int, centers: np.ndarray | None = None, spread: float = 0.9):
    """Unit vectors around random centers: like real embeddings, unlike uniform noise."""
    rng = np.random.default_rng(seed)
    if centers is None:
        centers = rng.standard_normal((200, dims)).astype(np.float32)
    x = centers[rng.integers(0, len(centers), n)] + spread * rng.standard_normal((n, dims)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), centers


def test_choice_follows_count_and_memory_budget():
    assert I.choose_factory(10_000, 256) == "IDMap,Flat"
    assert I.choose_factory(1_000_000, 256) == "IVF4096,Flat"  # 4·√N lists
    assert I.choose_factory(100_000, 256) == "IVF1024,Flat"
    # 1M x 256 floats = 1 GiB; a 300 MiB budget forces PQ codes that fit it.
    pq = I.choose_factory(1_000_000, 256, memory_budget_bytes=300 << 20)
    assert pq.startswith("OPQ") and ",IVF4096,PQ" in pq
    m = int(pq.rsplit("PQ", 1)[1])
    assert 1_000_000 * (m + 8) <= 300 << 20 and 256 % m == 0
    # Flat fits 10k vectors only within its budget.
    assert I.choose_factory(10_000, 256, memory_budget_bytes=1 << 20).startswith("OPQ")
    with pytest.raises(I.IndexBuildError, match="budget"):
        I.choose_factory(1_000_000, 256, memory_budget_bytes=1 << 20)
    with pytest.raises(I.IndexBuildError, match="0 vectors"):
        I.choose_factory(0, 256)


def test_ivf_lists_and_training_size_follow_faiss_guidance():
    for n in (2_000, 60_000, 1_000_000):
        nlist = I.ivf_lists(n)
        assert n >= I.MIN_POINTS_PER_LIST * nlist
        assert nlist & (nlist - 1) == 0
    x, _ = clustered(60_000, 16, 0)
    index, n_train = I.build_index(x, np.arange(len(x)), "IVF256,Flat")
    assert n_train == min(len(x), 256 * 256)
    assert index.ntotal == len(x)


def test_flat_round_trip_equals_exact_search_with_stable_ids(tmp_path):
    x, centers = clustered(3_000, 32, 1)
    q, _ = clustered(50, 32, 2, centers)
    ids = np.random.default_rng(3).choice(2**53, len(x), replace=False).astype(np.int64)
    index, manifest = I.build_tuned_index(x, ids, q, model="m")
    assert manifest.factory == "IDMap,Flat" and manifest.recall_at_10 == 1.0
    I.save_index(index, tmp_path)
    manifest.write(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.index", "manifest.json"]  # no temp files
    loaded, again = I.load_index(tmp_path)
    assert again == manifest
    scores, found = loaded.search(q, 10)
    exact_scores, rows = I.exact_search(x, q, 10)
    np.testing.assert_array_equal(found, ids[rows])
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5, atol=1e-6)


def test_ivf_reaches_the_recall_its_manifest_claims_on_fresh_queries(tmp_path):
    x, centers = clustered(20_000, 32, 4)
    held_out, _ = clustered(800, 32, 5, centers)
    fresh_q, _ = clustered(1_000, 32, 6, centers)  # seen by neither tuning nor the manifest
    ids = np.arange(len(x), dtype=np.int64) * 7 + 3
    index, manifest = I.build_tuned_index(x, ids, held_out, model="m", factory="IVF128,Flat")
    nprobe = manifest.search_params["nprobe"]
    assert 1 < nprobe < 128  # tuning found a real trade-off, not exhaustive search
    assert manifest.tuning_queries == manifest.check_queries == 400
    I.save_index(index, tmp_path)
    manifest.write(tmp_path)
    loaded, _ = I.load_index(tmp_path, mmap=True)  # large-index path: memory-mapped lists
    assert I._ivf_of(loaded).nprobe == nprobe

    def recall(queries, probes=nprobe):
        I.set_search_param(loaded, "nprobe", probes)
        return I.recall_at_k(loaded.search(queries, 10)[1], ids[I.exact_search(x, queries, 10)[1]])

    # The claim is the recall on the held-out half that tuning did not see, and it meets the target.
    tune_q, check_q = I.split_queries(held_out)
    assert manifest.recall_at_10 == pytest.approx(recall(check_q), abs=1e-4)
    assert manifest.recall_at_10 >= manifest.target_recall
    # Fresh queries reach the target too (the claim is not a tuning-set artefact).
    assert recall(fresh_q) >= manifest.target_recall
    assert recall(fresh_q) >= manifest.recall_at_10 - 0.01
    # The tuned value is the smallest that meets target + margin on the tuning half.
    assert manifest.tuning_recall_at_10 == pytest.approx(recall(tune_q), abs=1e-4)
    assert recall(tune_q, nprobe - 1) < manifest.target_recall + manifest.tuning_margin


def test_tuning_and_check_queries_are_disjoint_halves():
    q, _ = clustered(101, 8, 10)
    tune_q, check_q = I.split_queries(q, seed=3)
    assert len(tune_q) == 50 and len(check_q) == 51
    rows = {v.tobytes() for v in tune_q}
    assert not rows & {v.tobytes() for v in check_q}
    assert rows | {v.tobytes() for v in check_q} == {v.tobytes() for v in q}
    with pytest.raises(I.IndexBuildError, match="at least 2 held-out queries"):
        I.split_queries(q[:1])


def test_hnsw_tunes_ef_search():
    x, centers = clustered(4_000, 16, 7)
    q, _ = clustered(200, 16, 8, centers)
    index, manifest = I.build_tuned_index(x, np.arange(len(x)), q, model="m", factory="IDMap,HNSW16")
    assert "efSearch" in manifest.search_params and manifest.recall_at_10 >= 0.95


def test_bad_factory_and_missing_files_are_clear_errors(tmp_path):
    x, _ = clustered(100, 8, 9)
    with pytest.raises(I.IndexBuildError, match="invalid FAISS factory string 'Bogus12'"):
        I.build_index(x, np.arange(100), "Bogus12")
    with pytest.raises(I.IndexBuildError, match="100 vectors but 3 ids"):
        I.build_index(x, np.arange(3), "IDMap,Flat")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        I.load_index(tmp_path)

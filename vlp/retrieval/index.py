"""FAISS index: choose a factory string, train, add with stable ids, tune, save, load.

Vectors are L2-normalized and compared by inner product (= cosine). Ids are int64 item ids
kept inside the index (IVF stores them natively; Flat and HNSW are wrapped in IDMap), so
search results survive a reload and a merge in any order.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import faiss
import numpy as np

from vlp.atomic import atomic_write, atomic_write_bytes

log = logging.getLogger(__name__)

INDEX_FILE = "image.index"
MANIFEST_FILE = "manifest.json"
TARGET_RECALL = 0.95
# Tuning aims this far above the target so that fresh queries still reach it.
TUNING_MARGIN = 0.01
RECALL_K = 10
# Below this many vectors exact search is fast enough (FAISS guidance: Flat below ~50k).
FLAT_MAX = 50_000
# FAISS k-means wants 30..256 training points per centroid.
MIN_POINTS_PER_LIST = 39
MAX_POINTS_PER_LIST = 256
# k-means cost grows with points x lists; past this many points the centroids barely move
# (at 4096 lists it still leaves 64 points per list, inside the 39..256 guidance).
MAX_TRAIN_POINTS = 1 << 18
# Indexes larger than this load memory-mapped instead of into RAM.
MMAP_MIN_BYTES = 1 << 30


class IndexBuildError(ValueError):
    """A user mistake about an index (bad factory, empty input, missing files)."""


@dataclass
class Manifest:
    model: str
    count: int
    dims: int
    factory: str
    metric: str = "inner_product"
    search_params: dict = field(default_factory=dict)
    # Measured on `check_queries` held-out queries that tuning did not see.
    recall_at_10: Optional[float] = None
    tuning_queries: int = 0
    target_recall: float = TARGET_RECALL
    train_points: int = 0
    build_seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    check_queries: int = 0
    tuning_margin: float = 0.0
    tuning_recall_at_10: Optional[float] = None

    def write(self, directory: Path) -> None:
        atomic_write_bytes(Path(directory) / MANIFEST_FILE,
                           json.dumps(asdict(self), indent=2).encode())

    @classmethod
    def read(cls, directory: Path) -> "Manifest":
        path = Path(directory) / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(f"index manifest not found: {path}")
        return cls(**json.loads(path.read_text()))


# --------------------------------------------------------------------------- choice

def choose_factory(count: int, dims: int, memory_budget_bytes: Optional[int] = None) -> str:
    """The factory string for `count` vectors of `dims` floats within a memory budget.

    Flat when small; IVF-Flat in the middle (faster to train than HNSW on few cores, and
    its nprobe trades recall for speed smoothly); OPQ+IVF+PQ when full vectors do not fit.
    """
    if count <= 0:
        raise IndexBuildError("cannot build an index over 0 vectors")
    flat_bytes = count * dims * 4
    budget = memory_budget_bytes if memory_budget_bytes is not None else 1 << 62
    if count <= FLAT_MAX and flat_bytes <= budget:
        return "IDMap,Flat"
    nlist = ivf_lists(count)
    if flat_bytes + count * 8 <= budget:
        return f"IVF{nlist},Flat"
    # PQ code bytes per vector: the largest m dividing dims whose codes (+ ids) fit.
    per_vector = budget / count - 8
    candidates = [m for m in (64, 48, 32, 24, 16, 12, 8, 4) if dims % m == 0 and m <= dims]
    fitting = [m for m in candidates if m <= per_vector]
    if not fitting:
        raise IndexBuildError(
            f"{count} vectors do not fit a {budget / 2**20:.0f} MiB budget even as "
            f"{min(candidates)}-byte PQ codes; raise --memory-budget")
    m = fitting[0]
    return f"OPQ{m}_{dims},IVF{nlist},PQ{m}"


def ivf_lists(count: int) -> int:
    """nlist ≈ 4·√N rounded to a power of two, with ≥ 39 training points per list."""
    nlist = 2 ** round(math.log2(max(4 * math.sqrt(count), 1)))
    while nlist > 1 and count < MIN_POINTS_PER_LIST * nlist:
        nlist //= 2
    return max(nlist, 1)


def training_size(index: faiss.Index, count: int) -> int:
    """How many vectors to train on: up to 256 per IVF list (FAISS guidance), at least 39 per
    list and 256·39 for PQ/OPQ codebooks, capped at MAX_TRAIN_POINTS."""
    if index.is_trained:
        return 0
    ivf = _ivf_of(index)
    nlist = ivf.nlist if ivf is not None else 0
    want = min(MAX_POINTS_PER_LIST * nlist, max(MAX_TRAIN_POINTS, MIN_POINTS_PER_LIST * nlist))
    want = max(want, 256 * MIN_POINTS_PER_LIST)  # PQ/OPQ codebooks have 256 centroids
    return min(count, want)


# --------------------------------------------------------------------------- build

def build_index(vectors: np.ndarray, ids: np.ndarray, factory: str, seed: int = 0) -> tuple[faiss.Index, int]:
    """Train (on a seeded sample) and fill an inner-product index; returns (index, n_train)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if len(vectors) != len(ids):
        raise IndexBuildError(f"{len(vectors)} vectors but {len(ids)} ids")
    if len(vectors) == 0:
        raise IndexBuildError("cannot build an index over 0 vectors")
    try:
        index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise IndexBuildError(f"invalid FAISS factory string '{factory}': {str(err).splitlines()[-1]}") from err
    n_train = training_size(index, len(vectors))
    if n_train:
        sample = np.random.default_rng(seed).choice(len(vectors), n_train, replace=False)
        index.train(vectors[np.sort(sample)])
    for start in range(0, len(vectors), 65536):
        index.add_with_ids(vectors[start:start + 65536], ids[start:start + 65536])
    return index, n_train


def exact_search(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k: (scores, row positions)."""
    flat = faiss.IndexFlatIP(database.shape[1])
    flat.add(np.ascontiguousarray(database, dtype=np.float32))
    return flat.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(database)))


def recall_at_k(found_ids: np.ndarray, true_ids: np.ndarray) -> float:
    """Mean |found ∩ true| / |true| per query (autofaiss' intersection recall)."""
    hits = [len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found_ids, true_ids)]
    return float(np.mean(hits) / true_ids.shape[1])


# --------------------------------------------------------------------------- tuning

def tunable_parameter(index: faiss.Index) -> Optional[str]:
    if _ivf_of(index) is not None:
        return "nprobe"
    if _hnsw_of(index) is not None:
        return "efSearch"
    return None


def set_search_param(index: faiss.Index, name: str, value: int) -> None:
    if name == "nprobe":
        _ivf_of(index).nprobe = int(value)
    elif name == "efSearch":
        _hnsw_of(index).hnsw.efSearch = int(value)
    else:
        raise IndexBuildError(f"unknown search parameter '{name}' (nprobe, efSearch)")


def tune(index: faiss.Index, queries: np.ndarray, true_ids: np.ndarray,
         target: float = TARGET_RECALL) -> tuple[dict, float]:
    """Smallest nprobe/efSearch whose recall@10 vs exact reaches `target` on `queries`.

    Doubles the parameter until the target is met, then bisects between the last failing
    and the first passing value. Returns (params, measured recall).
    """
    name = tunable_parameter(index)
    k = true_ids.shape[1]

    def measure(value: int) -> float:
        set_search_param(index, name, value)
        return recall_at_k(index.search(queries, k)[1], true_ids)

    if name is None:
        return {}, recall_at_k(index.search(queries, k)[1], true_ids)
    upper = _ivf_of(index).nlist if name == "nprobe" else 4096
    lo, hi = 0, (1 if name == "nprobe" else 16)
    recalls = {}
    while True:
        recalls[hi] = measure(hi)
        if recalls[hi] >= target or hi >= upper:
            break
        lo, hi = hi, min(hi * 2, upper)
    if recalls[hi] < target:
        log.warning("recall@%d target %.2f not reached: %s=%d gives %.3f", k, target, name, hi, recalls[hi])
    while hi - lo > 1 and recalls[hi] >= target:
        mid = (lo + hi) // 2
        recalls[mid] = measure(mid)
        if recalls[mid] >= target:
            hi = mid
        else:
            lo = mid
    set_search_param(index, name, hi)
    return {name: hi}, recalls[hi]


# --------------------------------------------------------------------------- io

def save_index(index: faiss.Index, directory: Path) -> Path:
    """Write the index atomically (temp file in the same folder, then rename)."""
    path = Path(directory) / INDEX_FILE
    atomic_write(path, lambda tmp: faiss.write_index(index, str(tmp)))
    return path


def load_index(directory: Path, mmap: Optional[bool] = None) -> tuple[faiss.Index, Manifest]:
    """Read index + manifest and apply the tuned search parameters.

    Large IVF indexes are memory-mapped (read-only, pages loaded on demand) unless
    `mmap=False`; mmap applies only to IVF inverted lists, so others read normally.
    """
    directory = Path(directory)
    manifest = Manifest.read(directory)
    path = directory / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"index file not found: {path}")
    use_mmap = mmap if mmap is not None else path.stat().st_size >= MMAP_MIN_BYTES
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if use_mmap and "IVF" in manifest.factory else 0
    index = faiss.read_index(str(path), flags)
    for name, value in manifest.search_params.items():
        set_search_param(index, name, value)
    return index, manifest


def index_bytes(directory: Path) -> int:
    return (Path(directory) / INDEX_FILE).stat().st_size


# --------------------------------------------------------------------------- whole recipe

def build_tuned_index(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, model: str,
                      factory: Optional[str] = None, memory_budget_bytes: Optional[int] = None,
                      target: float = TARGET_RECALL, margin: float = TUNING_MARGIN,
                      seed: int = 0) -> tuple[faiss.Index, Manifest]:
    """Choose (unless `factory` is given), train, fill and tune an index; measure its recall.

    `queries` are held-out query vectors (e.g. caption embeddings, or database vectors
    left out of the training sample); their exact top-10 is the recall reference. They are
    split in two disjoint halves: the search parameter is tuned on one to `target + margin`,
    and the recall the manifest records is measured on the other, which tuning never saw
    (the smallest parameter that passes on the tuning half is biased to pass narrowly).
    """
    start = time.perf_counter()
    factory = factory or choose_factory(len(vectors), vectors.shape[1], memory_budget_bytes)
    index, n_train = build_index(vectors, ids, factory, seed)
    if tunable_parameter(index) is None:  # nothing to tune: every query checks
        tune_q, check_q = queries[:0], np.ascontiguousarray(queries, dtype=np.float32)
        params, tuned = {}, None
    else:
        tune_q, check_q = split_queries(queries, seed)
        tune_truth = ids[exact_search(vectors, tune_q, RECALL_K)[1]]
        params, tuned = tune(index, tune_q, tune_truth, min(target + margin, 1.0))
    check_truth = ids[exact_search(vectors, check_q, RECALL_K)[1]]
    recall = recall_at_k(index.search(check_q, RECALL_K)[1], check_truth)
    if recall < target:
        log.warning("recall@%d on %d fresh queries is %.3f < target %.2f (tuning half: %.3f); "
                    "raise --tuning-margin", RECALL_K, len(check_q), recall, target, tuned or recall)
    manifest = Manifest(model=model, count=int(len(vectors)), dims=int(vectors.shape[1]),
                        factory=factory, search_params=params, recall_at_10=round(recall, 4),
                        tuning_queries=int(len(tune_q)), target_recall=target,
                        train_points=int(n_train),
                        build_seconds=round(time.perf_counter() - start, 2),
                        check_queries=int(len(check_q)), tuning_margin=margin,
                        tuning_recall_at_10=None if tuned is None else round(tuned, 4))
    log.info("index %s over %d vectors: %s recall@10=%.3f on fresh queries", factory, len(vectors), params, recall)
    return index, manifest


def split_queries(queries: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint seeded halves of the held-out queries: (tuning, checking)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if len(queries) < 2:
        raise IndexBuildError(f"need at least 2 held-out queries to tune and check an index, got {len(queries)}")
    order = np.random.default_rng(seed).permutation(len(queries))
    half = len(queries) // 2
    return queries[np.sort(order[:half])], queries[np.sort(order[half:])]


def held_out_queries(vectors: np.ndarray, n: int = 1000, seed: int = 1) -> np.ndarray:
    """A seeded sample of database vectors to tune on when no real queries exist."""
    rows = np.random.default_rng(seed).choice(len(vectors), min(n, len(vectors)), replace=False)
    return np.ascontiguousarray(vectors[np.sort(rows)], dtype=np.float32)


def _unwrap(index: faiss.Index) -> faiss.Index:
    index = faiss.downcast_index(index)
    while isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2, faiss.IndexPreTransform)):
        index = faiss.downcast_index(index.index)
    return index


def _ivf_of(index: faiss.Index):
    inner = _unwrap(index)
    return faiss.extract_index_ivf(inner) if isinstance(inner, faiss.IndexIVF) else None


def _hnsw_of(index: faiss.Index):
    inner = _unwrap(index)
    return inner if isinstance(inner, faiss.IndexHNSW) else None

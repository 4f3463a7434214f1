"""Benchmark the retrieval index and service on synthetic clustered vectors.

    python tools/bench_index.py --sizes 10000 100000 [--dims 256] [--http-requests 150]

For each size: the automatically chosen index vs exact (Flat) search, both measured in
this run — build time, index size, recall@10 against exact search on held-out queries,
single-thread one-query-at-a-time QPS, batch QPS — and HTTP latency (p50/p95) of
POST /search under 8 concurrent clients against `pipelines/serve.py` on 127.0.0.1.
Prints a markdown table and writes JSON next to it with --json.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import faiss
import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlp.retrieval import index as I  # noqa: E402
from vlp.retrieval import store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def clustered(n: int, centers: np.ndarray, rng: np.random.Generator, spread: float) -> np.ndarray:
    """Unit vectors around cluster centers, made in blocks to bound peak memory."""
    out = np.empty((n, centers.shape[1]), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        block = centers[rng.integers(0, len(centers), m)]
        block += spread * rng.standard_normal(block.shape, dtype=np.float32)
        out[start:start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def qps_single(index, queries: np.ndarray, seconds: float = 3.0) -> float:
    """One query per call on one thread, for up to `seconds` (at least 20 queries)."""
    faiss.omp_set_num_threads(1)
    done, start = 0, time.perf_counter()
    while done < len(queries) and (done < 20 or time.perf_counter() - start < seconds):
        index.search(queries[done:done + 1], 10)
        done += 1
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    return done / (time.perf_counter() - start)


def qps_batch(index, queries: np.ndarray) -> float:
    start = time.perf_counter()
    index.search(queries, 10)
    return len(queries) / (time.perf_counter() - start)


def write_item_store(directory: Path, vectors: np.ndarray) -> np.ndarray:
    """Synthetic items (no shards behind them) so the service can answer embedding queries."""
    rows = [{"id": store.item_id(f"item{i}"), "key": f"item{i}", "captions": [], "shard": "",
             "image_member": "", "image_offset": 0, "image_size": 0, "json": ""} for i in range(len(vectors))]
    store.write_chunk(directory, "bench-00000000-00000", rows, vectors,
                      np.zeros((0, vectors.shape[1]), np.float32), None, fp16=False)
    store.merge_chunks(directory)
    return np.array([r["id"] for r in rows], dtype=np.int64)


def http_latency(directory: Path, queries: np.ndarray, clients: int, per_client: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, str(ROOT / "pipelines/serve.py"), "--index", str(directory),
                               "--port", str(port), "--host", "127.0.0.1", "--no-model"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError("serve.py did not come up")
            time.sleep(0.2)
        latencies: list[float] = []
        errors = []
        lock = threading.Lock()

        def client(c: int) -> None:
            with httpx.Client(base_url=base, timeout=30) as http:
                for r in range(per_client):  # bounded loop
                    q = queries[(c * per_client + r) % len(queries)].tolist()
                    t = time.perf_counter()
                    resp = http.post("/search", json={"embedding": q, "k": 10})
                    dt = time.perf_counter() - t
                    with lock:
                        (latencies if resp.status_code == 200 else errors).append(dt)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(30)
    ms = np.array(latencies) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "requests": len(latencies), "errors": len(errors), "req_per_s": len(latencies) / wall}


def bench(n: int, dims: int, args) -> dict:
    rng = np.random.default_rng(n)
    centers = rng.standard_normal((args.clusters, dims), dtype=np.float32)
    vectors = clustered(n, centers, rng, args.spread)
    held_out = clustered(2 * args.queries, centers, rng, args.spread)  # build: half tune, half check
    eval_q = clustered(args.queries, centers, rng, args.spread)
    out: dict = {"n": n, "dims": dims}

    start = time.perf_counter()
    flat = faiss.IndexFlatIP(dims)
    flat.add(vectors)
    out["exact"] = {"build_s": time.perf_counter() - start, "bytes": n * dims * 4,
                    "recall_at_10": 1.0, "qps_single": qps_single(flat, eval_q), "qps_batch": qps_batch(flat, eval_q)}
    _, true_rows = flat.search(eval_q, 10)

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        directory = Path(tmp)
        ids = write_item_store(directory, vectors)
        start = time.perf_counter()
        index, manifest = I.build_tuned_index(vectors, ids, held_out, model="synthetic", factory=args.factory)
        build_s = time.perf_counter() - start
        I.save_index(index, directory)
        manifest.write(directory)
        found = index.search(eval_q, 10)[1]
        out["index"] = {"factory": manifest.factory, "params": manifest.search_params,
                        "build_s": build_s, "bytes": I.index_bytes(directory),
                        "recall_at_10": I.recall_at_k(found, ids[true_rows]),
                        "manifest_recall_at_10": manifest.recall_at_10,
                        "qps_single": qps_single(index, eval_q), "qps_batch": qps_batch(index, eval_q)}
        del flat, index
        if args.http_requests:
            out["http"] = http_latency(directory, eval_q, args.clients, args.http_requests)
    out["speedup_single"] = out["index"]["qps_single"] / out["exact"]["qps_single"]
    return out


def table(results: list[dict]) -> str:
    lines = ["| N | index (tuned) | build s | size MiB | recall@10 | 1-query QPS (1 thread) | batch QPS | "
             "speed-up vs exact (1-query) | HTTP p50 / p95 ms (8 clients) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for name in ("exact", "index"):
            m = r[name]
            label = "Flat (exact, baseline)" if name == "exact" else f"`{m['factory']}` {m['params']}"
            http = r.get("http") if name == "index" else None
            speedup = "1.0x" if name == "exact" else f"{r['speedup_single']:.0f}x"
            latency = f"{http['p50_ms']:.1f} / {http['p95_ms']:.1f}" if http else "—"
            claim = f" (manifest: {m['manifest_recall_at_10']:.3f})" if name == "index" else ""
            lines.append(
                f"| {r['n']:,} | {label} | {m['build_s']:.1f} | {m['bytes'] / 2**20:.0f} | {m['recall_at_10']:.3f}{claim} | "
                f"{m['qps_single']:,.0f} | {m['qps_batch']:,.0f} | {speedup} | {latency} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--dims", type=int, default=256)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=2.0,
                   help="noise scale around each center (2.0: neighbours cross clusters, so IVF must probe)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--factory", help="force a factory instead of the automatic choice")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--http-requests", type=int, default=150, help="requests per client (0 skips HTTP)")
    p.add_argument("--tmp", default=None, help="scratch directory for index files")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    results = []
    for n in args.sizes:
        results.append(bench(n, args.dims, args))
        print(json.dumps(results[-1]), flush=True)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

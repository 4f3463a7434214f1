"""Load and abuse benchmark of the search service: `pipelines/serve.py` on 127.0.0.1 under
bounded concurrent traffic, good and hostile together.

    python tools/bench_service.py --index runs/demo/index [--requests 600] [--concurrency 8] [--json out.json]

Two phases against one server process, in the same run:
  baseline  good requests only: text queries (the index's own captions, a third with FILIP
            rerank where the model has FILIP) and image queries (the index's own images, read from its shards);
  abuse     the same good requests shuffled together with as many bad ones (invalid JSON,
            lone surrogates, zero-width text, 50,000-deep nesting, string embeddings, k out
            of range, bad base64, undecodable bytes, unknown fields, over-size bodies, zero
            vectors, ITM rerank of an image), `--large` PNGs (1) of 13000x13000 RGBA pixels
            (~660 KB each, 169 MP: over the pixel budget, to be refused from the header) and
            `--near-budget` PNGs (2) of 6000x6000 RGBA (36 MP: decoded, the costliest legal query).
Reported: per kind, status counts and p50/p95 latency; 5xx answers; good requests that
failed; bad requests answered with another status than the expected 4xx; the server's
resident memory at rest and its peak (sampled every 10 ms); the abuse/baseline ratio of
the good requests' latency. Exit status 1 when a target is missed: no 5xx, no good request
failed, every bad one refused as expected, peak RSS under --max-rss-mb.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlp.config import load_config  # noqa: E402
from vlp.retrieval.shards import read_member  # noqa: E402


# --------------------------------------------------------------------------- request bodies

def png_declaring(width: int, height: int) -> bytes:
    """A one-color RGBA PNG of width x height pixels, compressed row by row: the client never
    holds the pixels, the file is ~1/1000 of them."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    packer, row, parts = zlib.compressobj(9), b"\0" + b"\x80\x10\x10\xff" * width, []
    for _ in range(height):
        parts.append(packer.compress(row))
    parts.append(packer.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def image_body(data: bytes, **extra) -> bytes:
    return json.dumps({"image": base64.b64encode(data).decode(), **extra}).encode()


def model_has_filip(index: Path) -> bool:
    """Whether the index's model was trained with FILIP (a FILIP rerank is a good request)."""
    model = Path(json.loads((index / "build.json").read_text())["model"])
    return load_config(model / "config.yaml").loss.filip.weight > 0


def good_requests(index: Path, n: int, rng: random.Random) -> list[tuple[str, bytes, int]]:
    """(kind, body, expected status): the index's own captions and images; a third of the
    text queries FILIP-reranked where the model has FILIP."""
    items = pq.read_table(index / "items.parquet", columns=["captions", "shard", "image_offset", "image_size"])
    rows = items.to_pylist()
    filip = model_has_filip(index)
    out = []
    for i in range(n):
        row = rows[rng.randrange(len(rows))]
        if i % 2 == 0:
            extra = {"rerank": "filip"} if filip and i % 6 == 0 else {}
            out.append(("good_text", json.dumps({"text": row["captions"][0], "k": 10, **extra}).encode(), 200))
        else:
            data = read_member(row["shard"], row["image_offset"], row["image_size"])
            out.append(("good_image", image_body(data, k=10), 200))
    return out


def bad_requests(n: int, dims: int, max_body: int) -> list[tuple[str, bytes, int]]:
    catalogue = [
        (b"{not json", 400),
        (b'{"text": "\\ud800 red"}', 422),
        (b'{"text": "\\u200b\\u200d\\ufeff"}', 422),
        (b"[" * 50_000 + b"]" * 50_000, 400),
        (b'{"embedding": ["1", true]}', 422),
        (b'{"text": "a red apple", "k": 0}', 422),
        (b'{"text": "a red apple", "k": 100000}', 422),
        (b'{"image": "%%%not base64"}', 400),
        (image_body(b"these bytes are no image"), 400),
        (b'{"text": "a red apple", "colour": "red"}', 422),
        (b'{"text": "a red apple", "rerank": "bm25"}', 422),
        (json.dumps({"embedding": [0.0] * dims}).encode(), 400),
        (b"{}", 422),
        (image_body(png_declaring(32, 32), rerank="itm"), 400),
        (b'{"text": "' + b"x" * (max_body + 1) + b'"}', 413),
    ]
    return [("bad", *catalogue[i % len(catalogue)]) for i in range(n)]


# --------------------------------------------------------------------------- server

@contextmanager
def running_server(index: Path, args: list[str]):
    """serve.py in its own process on a free port of 127.0.0.1; yields (port, process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, str(ROOT / "pipelines/serve.py"), "--index", str(index),
                               "--host", "127.0.0.1", "--port", str(port), *args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while call(port, "GET", "/health")[0] != 200:
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"serve.py did not come up: {server.stderr.read()[-2000:]}")
            time.sleep(0.2)
        yield port, server
    finally:
        server.terminate()
        server.wait(30)


class PeakRSS:
    """Samples a process's resident memory every 10 ms until stopped."""

    def __init__(self, pid: int):
        self.process, self.peak, self.running = psutil.Process(pid), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return self.peak


_local = threading.local()


def call(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, float]:
    """(status or 0 when the connection failed, seconds); one keep-alive connection per thread."""
    start = time.perf_counter()
    try:
        conn = getattr(_local, "conn", None) or http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        _local.conn = conn
        conn.request(method, path, body=body, headers={"content-type": "application/json"} if body else {})
        response = conn.getresponse()
        response.read()
        if response.getheader("connection", "").lower() == "close":
            conn.close()
            _local.conn = None
        return response.status, time.perf_counter() - start
    except (OSError, http.client.HTTPException):
        if getattr(_local, "conn", None) is not None:
            _local.conn.close()
        _local.conn = None
        return 0, time.perf_counter() - start


def run_phase(port: int, requests: list[tuple[str, bytes, int]], concurrency: int) -> list[dict]:
    def one(request):
        kind, body, expected = request
        status, seconds = call(port, "POST", "/search", body)
        return {"kind": kind, "status": status, "expected": expected, "seconds": seconds}
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, requests))


# --------------------------------------------------------------------------- report

def summarize(results: list[dict]) -> dict:
    by_kind: dict[str, dict] = {}
    for kind in sorted({r["kind"] for r in results}):
        mine = [r for r in results if r["kind"] == kind]
        ms = np.array([r["seconds"] for r in mine]) * 1000
        statuses: dict[str, int] = {}
        for r in mine:
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        by_kind[kind] = {"n": len(mine), "statuses": statuses, "p50_ms": float(np.percentile(ms, 50)),
                         "p95_ms": float(np.percentile(ms, 95)),
                         "unexpected": sum(r["status"] != r["expected"] for r in mine)}
    return by_kind


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, type=Path)
    p.add_argument("--requests", type=int, default=600, help="good requests per phase (as many bad ones join them)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--large", type=int, default=1, help="13000x13000 RGBA PNGs in the abuse phase")
    p.add_argument("--near-budget", type=int, default=2, help="6000x6000 RGBA PNGs (36 MP) in the abuse phase")
    p.add_argument("--max-rss-mb", type=float, default=2048)
    p.add_argument("--serve-args", default="", help="extra serve.py arguments, e.g. '--threads 2'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    rng = random.Random(args.seed)
    manifest = json.loads((args.index / "manifest.json").read_text())
    max_body = 4 << 20
    good = good_requests(args.index, args.requests, rng)
    abuse = good + bad_requests(args.requests, manifest["dims"], max_body)
    abuse += [("large_image", image_body(png_declaring(13000, 13000)), 413)] * args.large
    abuse += [("near_budget_image", image_body(png_declaring(6000, 6000)), 200)] * args.near_budget
    rng.shuffle(abuse)
    with running_server(args.index, args.serve_args.split()) as (port, server):
        process = psutil.Process(server.pid)
        time.sleep(1.0)
        rest_mb = process.memory_info().rss / 2**20
        sampler = PeakRSS(server.pid)
        started = time.perf_counter()
        baseline = run_phase(port, good, args.concurrency)
        baseline_s = time.perf_counter() - started
        started = time.perf_counter()
        abused = run_phase(port, abuse, args.concurrency)
        abuse_s = time.perf_counter() - started
        peak_mb = sampler.stop() / 2**20
        after_mb = process.memory_info().rss / 2**20
        # A fresh connection: this thread's keep-alive one from the start-up check has been
        # idle longer than the server keeps it open, and a closed socket is not a dead server.
        _local.conn = None
        alive = call(port, "GET", "/health")[0] == 200
    report = {
        "index": str(args.index), "items": manifest["count"], "concurrency": args.concurrency,
        "baseline": {"seconds": baseline_s, **summarize(baseline)},
        "abuse": {"seconds": abuse_s, **summarize(abused)},
        "server_rss_mb": {"at_rest": rest_mb, "peak": peak_mb, "after": after_mb},
        "server_5xx": sum(r["status"] >= 500 for r in baseline + abused),
        "connection_failures": sum(r["status"] == 0 for r in baseline + abused),
        "good_failed": sum(r["status"] != 200 for r in baseline + abused if r["kind"].startswith("good")),
        "bad_unexpected": sum(r["status"] != r["expected"] for r in abused if not r["kind"].startswith("good")),
        "alive_after": alive,
    }
    for kind in ("good_text", "good_image"):
        report[f"{kind}_p50_ratio_abuse_vs_baseline"] = report["abuse"][kind]["p50_ms"] / report["baseline"][kind]["p50_ms"]
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    ok = (report["server_5xx"] == 0 and report["good_failed"] == 0 and report["bad_unexpected"] == 0
          and report["connection_failures"] == 0 and peak_mb < args.max_rss_mb and alive)
    print("targets met" if ok else "TARGET MISSED", flush=True)
    return 0 if ok else 1


def table(report: dict) -> str:
    lines = ["| phase | kind | n | statuses | p50 ms | p95 ms | unexpected status |", "|---|---|---|---|---|---|---|"]
    for phase in ("baseline", "abuse"):
        for kind, s in report[phase].items():
            if kind == "seconds":
                continue
            statuses = ", ".join(f"{code}: {n}" for code, n in sorted(s["statuses"].items()))
            lines.append(f"| {phase} | {kind} | {s['n']} | {statuses} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} "
                         f"| {s['unexpected']} |")
    rss = report["server_rss_mb"]
    lines.append("")
    lines.append(f"server RSS: {rss['at_rest']:.0f} MB at rest, peak {rss['peak']:.0f} MB, {rss['after']:.0f} MB after; "
                 f"5xx: {report['server_5xx']}; good failed: {report['good_failed']}; bad answered unexpectedly: "
                 f"{report['bad_unexpected']}; connection failures: {report['connection_failures']}; "
                 f"good p50 abuse/baseline: text {report['good_text_p50_ratio_abuse_vs_baseline']:.2f}x, "
                 f"image {report['good_image_p50_ratio_abuse_vs_baseline']:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

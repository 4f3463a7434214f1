#!/usr/bin/env python3
"""Turn a folder of images into WebDataset shards (img2dataset layout).

    python tools/make_shards.py SRC OUT [--maxcount 1000] [--val-fraction 0.05] [--seed 0]

Captions come from, in this order of preference:
  SRC/captions.jsonl  one {"image": "rel/path.jpg", "caption": "..." | ["...", ...], ...}
                      per line; other fields are kept in the sample's json
  SRC/captions.csv    columns `image`, `caption` (+ any others, kept in json); several rows
                      for one image give it several captions
  rel/path.txt        a sidecar text file next to each image
The first caption goes to key.txt, the others to the json `captions` list.

Writes OUT/train-%06d.tar, OUT/val-%06d.tar (a seeded split by image) and OUT/sizes.json.
Every shard is written to a temp file and renamed when complete, so a killed run never
leaves a half-written shard that looks whole. Images that cannot be used are listed, with
the reason, in OUT/skipped.jsonl and summed up on stderr.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from vlp.data.images import IMAGE_EXTENSIONS, decode_image
from vlp.atomic import atomic_write_text
from vlp.data.writer import ShardWriter, write_sizes


def read_captions(src: Path) -> tuple[dict[str, dict], list[dict]]:
    """relpath → {"captions": [...], extra fields}, plus skips found while reading."""
    if (src / "captions.jsonl").is_file():
        return _read_jsonl(src / "captions.jsonl")
    if (src / "captions.csv").is_file():
        return _read_csv(src / "captions.csv")
    return _read_sidecars(src)


def _add(entries: dict, rel: str, captions, extra: dict) -> None:
    entry = entries.setdefault(rel, {"captions": []})
    entry["captions"] += [captions] if isinstance(captions, str) else list(captions)
    entry.update({k: v for k, v in extra.items() if k not in ("image", "caption", "captions")})


def _read_jsonl(path: Path) -> tuple[dict, list]:
    entries, skips = {}, []
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
            rel, caption = row["image"], row.get("caption", row.get("captions"))
            if not isinstance(rel, str) or not (isinstance(caption, str) or (
                    isinstance(caption, list) and all(isinstance(c, str) for c in caption))):
                raise ValueError('needs "image": str and "caption": str or list of str')
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            skips.append({"path": f"{path.name}:{n}", "reason": "bad_caption_line", "detail": str(err)})
            continue
        _add(entries, rel, caption, row)
    return entries, skips


def _read_csv(path: Path) -> tuple[dict, list]:
    entries, skips = {}, []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        sys.exit(f"{path} is not UTF-8: {err}")
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
        sys.exit(f"{path} needs a header with 'image' and 'caption' columns, got {reader.fieldnames}")
    for n, row in enumerate(reader, 2):
        if not row["image"]:
            skips.append({"path": f"{path.name}:{n}", "reason": "bad_caption_line", "detail": "empty image"})
            continue
        _add(entries, row["image"], row["caption"] or "", row)
    return entries, skips


def _read_sidecars(src: Path) -> tuple[dict, list]:
    entries, skips = {}, []
    for image in _images(src):
        rel = image.relative_to(src).as_posix()
        sidecar = image.with_suffix(".txt")
        if not sidecar.is_file():
            continue  # reported as missing_caption with the other images
        try:
            _add(entries, rel, sidecar.read_bytes().decode("utf-8"), {})
        except UnicodeDecodeError as err:
            skips.append({"path": rel, "reason": "bad_text", "detail": f"{sidecar.name} is not UTF-8: {err}"})
            entries[rel] = None  # known, but unusable
    return entries, skips


def _images(src: Path) -> list[Path]:
    return sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)


def collect(src: Path) -> tuple[list[dict], list[dict]]:
    """Usable samples (image bytes + captions + extra fields) and the skipped ones."""
    entries, skips = read_captions(src)
    on_disk = {p.relative_to(src).as_posix() for p in _images(src)}
    for rel in sorted(on_disk - entries.keys()):
        skips.append({"path": rel, "reason": "missing_caption", "detail": "no caption found"})
    items = []
    for rel, entry in tqdm(sorted(entries.items()), desc="checking images", unit="img", disable=None):
        if entry is None:
            continue
        path = src / rel
        if not path.is_file():
            skips.append({"path": rel, "reason": "missing_image", "detail": "listed but not found"})
            continue
        if path.suffix.lower().lstrip(".") not in IMAGE_EXTENSIONS:
            skips.append({"path": rel, "reason": "bad_image", "detail": f"extension not in {IMAGE_EXTENSIONS}"})
            continue
        captions = [c.strip() for c in entry["captions"] if c.strip()]
        if not captions:
            skips.append({"path": rel, "reason": "empty_caption", "detail": "every caption is blank"})
            continue
        data = path.read_bytes()
        try:
            decode_image(data, 1)  # full decode (at the smallest scale): catches truncation
        except Exception as err:
            skips.append({"path": rel, "reason": "bad_image", "detail": f"{type(err).__name__}: {err}"})
            continue
        extra = {k: v for k, v in entry.items() if k != "captions"}
        items.append({"rel": rel, "data": data, "captions": captions, "extra": extra})
    return items, skips


def write_shards(items: list[dict], out: Path, maxcount: int, val_fraction: float, seed: int) -> dict[str, int]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = round(len(items) * val_fraction)
    splits = {"val": order[:n_val], "train": order[n_val:]}
    sizes = {}
    for split, indices in splits.items():
        if not indices:
            continue
        with ShardWriter(out, split, maxcount) as writer:
            for index in tqdm(indices, desc=f"writing {split}", unit="img", disable=None):
                item = items[index]
                ext = Path(item["rel"]).suffix.lower().lstrip(".")
                writer.write({
                    "__key__": f"{index:09d}",
                    ext: item["data"],
                    "txt": item["captions"][0],
                    "json": {**item["extra"], "image": item["rel"], "captions": item["captions"][1:]},
                })
        sizes.update(writer.close())
    write_sizes(out, sizes)
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="folder of images (+ captions.jsonl / captions.csv / .txt sidecars)")
    parser.add_argument("out", type=Path, help="output folder for the shards")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="fraction of images for val (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle and split (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="delete shards already in OUT first")
    args = parser.parse_args(argv)
    if not args.src.is_dir():
        parser.error(f"source folder not found: {args.src}")
    if args.maxcount < 1 or not 0.0 <= args.val_fraction < 1.0:
        parser.error("--maxcount must be >= 1 and --val-fraction in [0, 1)")
    existing = sorted(args.out.glob("train-*.tar")) + sorted(args.out.glob("val-*.tar"))
    if existing and not args.overwrite:
        parser.error(f"{args.out} already has shards ({existing[0].name}, ...); pass --overwrite to replace them")
    for old in existing + [args.out / "sizes.json"]:
        old.unlink(missing_ok=True)

    items, skips = collect(args.src)
    if not items:
        print(f"no usable images in {args.src} ({len(skips)} skipped)", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = write_shards(items, args.out, args.maxcount, args.val_fraction, args.seed) if items else {}
    atomic_write_text(args.out / "skipped.jsonl", "".join(json.dumps(s) + "\n" for s in skips))
    counts = Counter(s["reason"] for s in skips)
    print(f"wrote {sum(sizes.values())} samples in {len(sizes)} shards to {args.out}", file=sys.stderr)
    if skips:
        print(f"skipped {len(skips)}: " + ", ".join(f"{r} {n}" for r, n in counts.most_common())
              + f" (details in {args.out / 'skipped.jsonl'})", file=sys.stderr)
        for s in skips[:10]:
            print(f"  {s['path']}: {s['reason']} ({s['detail']})", file=sys.stderr)
    return 0 if items else 1


if __name__ == "__main__":
    sys.exit(main())

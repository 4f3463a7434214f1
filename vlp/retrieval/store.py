"""Embedding chunks on disk, their merge, and the item store the searcher reads.

Layout of an index directory:

    chunks/NAME.img.npy   image embeddings of one chunk   [n, D]   (fp16 or fp32)
    chunks/NAME.txt.npy   caption embeddings, flattened    [m, D]
    chunks/NAME.tok.npy   FILIP image tokens (optional)    [n, T, Dt] fp16
    chunks/NAME.parquet   item metadata; written last, so it marks the chunk finished
    items.parquet, image_embeddings.npy, text_embeddings.npy, text_owner.npy,
    image_tokens.npy      the merge of all finished chunks (row = position in items)

A chunk is a fixed run of samples of one shard, so its name is known before it is
embedded and a restarted build skips finished chunks. Ranks embedding disjoint shards write
disjoint chunks; merging is concatenation in name order, with duplicate ids dropped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from vlp.atomic import atomic_write

log = logging.getLogger(__name__)

CHUNKS = "chunks"
ITEMS = "items.parquet"
IMAGE_EMB = "image_embeddings.npy"
TEXT_EMB = "text_embeddings.npy"
TEXT_OWNER = "text_owner.npy"
IMAGE_TOKENS = "image_tokens.npy"
# Ids stay below 2**53 so JavaScript (the search page) reads them exactly.
ID_BITS = 53

ITEM_SCHEMA = pa.schema([
    ("id", pa.int64()), ("key", pa.string()), ("captions", pa.list_(pa.string())),
    ("shard", pa.string()), ("image_member", pa.string()), ("image_offset", pa.int64()),
    ("image_size", pa.int64()), ("json", pa.string()),
])


def item_id(key: str) -> int:
    """Stable id of a sample key: the same key gets the same id in every build and merge."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << ID_BITS) - 1)


def chunk_name(shard: str, part: int) -> str:
    """`train-000003-1a2b3c4d-00002`: readable stem + hash of the absolute path."""
    path = os.path.abspath(shard)
    stem = Path(path).name.split(".", 1)[0]
    return f"{stem}-{hashlib.sha1(path.encode()).hexdigest()[:8]}-{part:05d}"


def finished_chunks(index_dir: Path) -> set[str]:
    return {p.name[: -len(".parquet")] for p in (Path(index_dir) / CHUNKS).glob("*.parquet")}


def write_chunk(index_dir: Path, name: str, rows: list[dict], image_emb: np.ndarray,
                text_emb: np.ndarray, tokens: Optional[np.ndarray], fp16: bool) -> None:
    """Write one chunk; every file is atomic and the parquet goes last."""
    directory = Path(index_dir) / CHUNKS
    directory.mkdir(parents=True, exist_ok=True)
    dtype = np.float16 if fp16 else np.float32
    _save_npy(directory / f"{name}.img.npy", image_emb.astype(dtype))
    _save_npy(directory / f"{name}.txt.npy", text_emb.astype(dtype))
    if tokens is not None:
        _save_npy(directory / f"{name}.tok.npy", tokens.astype(np.float16))
    table = pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)
    atomic_write(directory / f"{name}.parquet", lambda tmp: pq.write_table(table, tmp))


def clean_partial(index_dir: Path) -> int:
    """Remove temp files and the arrays of chunks whose parquet was never written."""
    directory = Path(index_dir) / CHUNKS
    if not directory.is_dir():
        return 0
    done = finished_chunks(index_dir)
    removed = 0
    for path in directory.iterdir():
        name = path.name.split(".", 1)[0] if not path.name.startswith(".") else None
        if name is None or name not in done:
            path.unlink()
            removed += 1
    return removed


def merge_chunks(index_dir: Path, extra_dirs: Iterable[Path] = ()) -> int:
    """Concatenate every finished chunk (here and in `extra_dirs`) into the item store.

    Returns the number of items. Duplicate ids (the same key in two shards) keep their
    first occurrence in chunk-name order; the drops are counted and logged.
    """
    index_dir = Path(index_dir)
    sources = {}
    for directory in [index_dir, *map(Path, extra_dirs)]:
        for name in sorted(finished_chunks(directory)):
            sources.setdefault(name, directory / CHUNKS / name)
    if not sources:
        raise FileNotFoundError(f"no finished embedding chunks in {index_dir / CHUNKS}")
    tables, seen, keep_masks, duplicates = [], set(), {}, 0
    for name, stem in sorted(sources.items()):
        table = pq.read_table(f"{stem}.parquet", schema=ITEM_SCHEMA)
        ids = table.column("id").to_pylist()
        mask = np.array([i not in seen for i in ids], dtype=bool)
        seen.update(ids)
        duplicates += int((~mask).sum())
        keep_masks[name] = mask
        tables.append(table.filter(pa.array(mask)))
    if duplicates:
        log.warning("merge: dropped %d items whose key (id) already appeared in an earlier chunk", duplicates)
    items = pa.concat_tables(tables)
    atomic_write(index_dir / ITEMS, lambda tmp: pq.write_table(items, tmp))
    _merge_arrays(index_dir / IMAGE_EMB, [(f"{s}.img.npy", keep_masks[n]) for n, s in sorted(sources.items())])
    _merge_texts(index_dir, sources, keep_masks)
    token_files = [(f"{s}.tok.npy", keep_masks[n]) for n, s in sorted(sources.items())]
    if all(Path(f).is_file() for f, _ in token_files):
        _merge_arrays(index_dir / IMAGE_TOKENS, token_files)
    elif (index_dir / IMAGE_TOKENS).exists():
        (index_dir / IMAGE_TOKENS).unlink()
    return items.num_rows


def _merge_texts(index_dir: Path, sources: dict[str, Path], keep_masks: dict[str, np.ndarray]) -> None:
    """Caption embeddings of kept items, and the row of the image each belongs to."""
    with_text = any(len(np.load(f"{stem}.txt.npy", mmap_mode="r")) for stem in sources.values())
    if not with_text:  # built without caption embeddings
        dims = np.load(index_dir / IMAGE_EMB, mmap_mode="r").shape[1]
        _save_npy(index_dir / TEXT_EMB, np.zeros((0, dims), np.float32))
        _save_npy(index_dir / TEXT_OWNER, np.zeros(0, np.int64))
        return
    text_masks, owners, offset = [], [], 0
    for name, stem in sorted(sources.items()):
        table = pq.read_table(f"{stem}.parquet", columns=["captions"])
        counts = np.array([len(c) for c in table.column("captions").to_pylist()], dtype=np.int64)
        mask = keep_masks[name]
        text_masks.append((f"{stem}.txt.npy", np.repeat(mask, counts)))
        kept_counts = counts[mask]
        owners.append(np.repeat(np.arange(offset, offset + len(kept_counts)), kept_counts))
        offset += len(kept_counts)
    _merge_arrays(index_dir / TEXT_EMB, text_masks)
    _save_npy(index_dir / TEXT_OWNER, np.concatenate(owners).astype(np.int64))


class ItemStore:
    """Items of a merged index: metadata by id, embeddings and tokens by row (mmapped)."""

    def __init__(self, index_dir: Path):
        self.dir = Path(index_dir)
        path = self.dir / ITEMS
        if not path.is_file():
            raise FileNotFoundError(f"item metadata not found: {path} (run build_index.py first)")
        self.table = pq.read_table(path)
        self.ids = self.table.column("id").to_numpy()
        self._row_of = {int(i): r for r, i in enumerate(self.ids)}
        self.image_emb = np.load(self.dir / IMAGE_EMB, mmap_mode="r")
        self.text_emb = np.load(self.dir / TEXT_EMB, mmap_mode="r")
        self.text_owner = np.load(self.dir / TEXT_OWNER)
        tokens = self.dir / IMAGE_TOKENS
        self.tokens = np.load(tokens, mmap_mode="r") if tokens.is_file() else None
        self._captions = self.table.column("captions").to_pylist()
        self.keys = self.table.column("key").to_pylist()

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, item_id: int) -> Optional[int]:
        return self._row_of.get(int(item_id))

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return np.array([self._row_of[int(i)] for i in ids], dtype=np.int64)

    def captions(self, row: int) -> list[str]:
        return self._captions[row]

    def item(self, row: int) -> dict:
        record = self.table.slice(row, 1).to_pylist()[0]
        record["json"] = json.loads(record["json"]) if record["json"] else {}
        return record

    def shard_ends(self) -> dict[str, int]:
        """{shard path: the byte its items' images end at}: a shard shorter than that is cut."""
        ends = pa.compute.add(self.table.column("image_offset"), self.table.column("image_size"))
        grouped = pa.table({"shard": self.table.column("shard"), "end": ends}).group_by("shard").aggregate(
            [("end", "max")])
        return dict(zip(grouped.column("shard").to_pylist(), grouped.column("end_max").to_pylist()))

    def text_rows_of(self, image_rows: np.ndarray) -> np.ndarray:
        return np.flatnonzero(np.isin(self.text_owner, image_rows))


def _merge_arrays(out: Path, parts: list[tuple[str, np.ndarray]]) -> None:
    """Stream masked parts into one .npy through a memory map (never all in RAM)."""
    shapes = [np.load(path, mmap_mode="r") for path, _ in parts]
    first = next((a for a in shapes if len(a)), shapes[0])
    total = sum(int(mask.sum()) for _, mask in parts)

    def write(tmp: Path) -> None:
        merged = np.lib.format.open_memmap(tmp, mode="w+", dtype=first.dtype,
                                           shape=(total, *first.shape[1:]))
        at = 0
        for path, mask in parts:
            part = np.load(path, mmap_mode="r")
            if len(part) != len(mask):
                raise ValueError(f"{path}: {len(part)} rows but its metadata has {len(mask)}")
            kept = int(mask.sum())
            merged[at:at + kept] = part[mask] if kept < len(mask) else part
            at += kept
        merged.flush()

    atomic_write(out, write)


def _save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda tmp: np.save(tmp, array))

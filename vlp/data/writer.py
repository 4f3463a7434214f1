"""Writing shards: img2dataset layout, byte-for-byte reproducible, never half-written.

A shard is written to a hidden temp file and renamed into place only when complete, so a
killed run leaves either a whole `train-000003.tar` or none (plus a `.tmp` to ignore).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Iterable

from vlp.atomic import atomic_write, atomic_write_json


def write_sizes(out_dir: Path, sizes: dict[str, int]) -> None:
    """Merge `sizes` into OUT/sizes.json ({"train-000000.tar": 1234, ...})."""
    path = out_dir / "sizes.json"
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged.update(sizes)
    atomic_write_json(path, dict(sorted(merged.items())), indent=1)


class ShardWriter:
    """Samples → `OUT/{prefix}-%06d.tar`, at most `maxcount` samples per shard.

    A sample is {"__key__": str, "jpg": bytes, "txt": str, "json": dict, ...}; members are
    written as key.ext in sorted-extension order with mtime 0, so equal input gives equal
    bytes. `close()` returns {shard name: sample count}."""

    def __init__(self, out_dir: str | Path, prefix: str, maxcount: int):
        if maxcount < 1:
            raise ValueError(f"maxcount must be >= 1, got {maxcount}")
        self.out_dir, self.prefix, self.maxcount = Path(out_dir), prefix, maxcount
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.sizes: dict[str, int] = {}
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0

    def write(self, sample: dict) -> None:
        if self._tar is None or self._count >= self.maxcount:
            self._finish()
            self._open()
        _add_sample(self._tar, sample)
        self._count += 1

    def close(self) -> dict[str, int]:
        self._finish()
        return self.sizes

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # a failed run leaves no shard that looks whole
            self._tar.close()
            self._tmp.unlink(missing_ok=True)

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.sizes):06d}.tar"
        self._tmp = self.out_dir / f".{name}.tmp"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._count = 0
        self.sizes[name] = 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        name = f"{self.prefix}-{len(self.sizes) - 1:06d}.tar"
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp, self.out_dir / name)
        self.sizes[name] = self._count
        self._tar = None


def write_shard(path: str | Path, samples: Iterable[dict]) -> int:
    """All of `samples` as one shard at `path` (members as `ShardWriter` writes them),
    renamed into place only when complete; returns the sample count. For a tool that maps
    each input shard to one output shard of the same name (resumable shard by shard)."""
    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                _add_sample(tar, sample)
                count += 1

    atomic_write(path, write)
    return count


def _add_sample(tar: tarfile.TarFile, sample: dict) -> None:
    key = sample["__key__"]
    for ext in sorted(k for k in sample if not k.startswith("__")):
        data = _encode(sample[ext])
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        tar.addfile(info, io.BytesIO(data))


def _encode(value) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8")

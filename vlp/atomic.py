"""Atomic file writes: a reader (or a run resumed after a crash) sees the old file or the
complete new one, never half of one. Every room writes its outputs through these."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp)` to create a temporary file beside `path`, flush it to disk, then
    rename it over `path`. The temporary name keeps `path`'s suffix, because some writers
    (numpy, matplotlib) choose the format by it; it is made by `write`, so it gets the
    normal umask permissions (mkstemp would leave it readable by the owner only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, value: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(value, indent=indent) + "\n")

"""Helpers for tests of the shard makers in tools/: load a tool as a module, and read a
split back through the real eval loader."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from vlp.config import DataConfig
from vlp.data import eval_loader

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


def split_spec(out: Path, split: str) -> str:
    """OUT/{split}-{000000..N}.tar, N from OUT/sizes.json."""
    sizes = json.loads((out / "sizes.json").read_text())
    n = len([name for name in sizes if name.startswith(f"{split}-")])
    return str(out / f"{split}-{{000000..{n - 1:06d}}}.tar")


def read_split(out: Path, split: str) -> dict[str, dict]:
    """key → {"captions": [...], "meta": {...}} through the real eval loader."""
    rows = {}
    for batch in eval_loader(DataConfig(val=split_spec(out, split), workers=0, eval_batch_size=5), None):
        for i, key in enumerate(batch["key"]):
            caps = [t for t, j in zip(batch["text"], batch["text_image_index"]) if j == i]
            rows[key] = {"captions": caps, "meta": batch["meta"][i]}
    return rows

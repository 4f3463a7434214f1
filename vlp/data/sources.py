"""Shard URL specs (brace expansion, `::` joins) and epoch lengths (sizes.json or explicit)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import braceexpand

from vlp.config import ConfigError


def expand_spec(spec: str, what: str = "data") -> list[str]:
    """`a/train-{000..009}.tar::b/part-{0..3}.tar` → the list of shard URLs.
    Local paths must exist (an error names the first missing one); URLs with a scheme
    (`pipe:`, `http://`, ...) are passed to WebDataset unchecked."""
    if not spec or not spec.strip():
        raise ConfigError(f"config key '{what}' is empty: give a shard spec like dir/train-{{000000..000009}}.tar")
    urls = [url for part in spec.split("::") if part.strip()
            for url in braceexpand.braceexpand(part.strip())]
    for url in urls:
        if is_local(url) and not Path(url).is_file():
            raise FileNotFoundError(f"{what}: shard not found: {url} (from '{spec}')")
    return urls


def count_samples(urls: list[str], explicit: int | None, what: str) -> int:
    """Samples in `urls`: the explicit count if given, else the sum over each shard's entry
    in the `sizes.json` beside it ({"train-000000.tar": 1234, ...})."""
    if explicit is not None:
        if explicit < 1:
            raise ConfigError(f"config key '{what}' must be >= 1, got {explicit}")
        return explicit
    total, cache = 0, {}
    for url in urls:
        directory, name = os.path.split(url)
        sizes_path = Path(directory or ".") / "sizes.json"
        if sizes_path not in cache:
            cache[sizes_path] = _read_sizes(sizes_path, what)
        if name not in cache[sizes_path]:
            raise ConfigError(f"{sizes_path} has no entry for '{name}'; set '{what}' to the sample count")
        total += int(cache[sizes_path][name])
    return total


def _read_sizes(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"no {path} to count samples; set '{what}' to the sample count")
    try:
        sizes = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(sizes, dict):
        raise ConfigError(f"{path} must map shard file names to sample counts")
    return sizes


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith(("pipe:", "file:"))

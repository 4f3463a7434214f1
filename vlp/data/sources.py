"""Shard URL specs (brace expansion, `::` joins) and epoch lengths (explicit, sizes.json or
img2dataset's per-shard stats)."""
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
    """Samples in `urls`, in this order: the explicit count if given; else per shard its
    entry in the `sizes.json` beside it ({"train-000000.tar": 1234, ...}); else the
    `successes` of the `NNNNN_stats.json` img2dataset writes beside each shard; else an
    error naming the shard and `what`."""
    if explicit is not None:
        if explicit < 1:
            raise ConfigError(f"config key '{what}' must be >= 1, got {explicit}")
        return explicit
    total, sizes = 0, {}
    for url in urls:
        count = shard_sample_count(url, sizes)
        if count is None:
            directory, name = os.path.split(url)
            stem = name.split(".", 1)[0]
            raise ConfigError(f"no sample count for {url}: no entry for '{name}' in "
                              f"{Path(directory or '.') / 'sizes.json'} and no img2dataset "
                              f"{stem}_stats.json; set '{what}' to the sample count")
        total += count
    return total


def known_sample_count(urls: list[str]) -> int | None:
    """The total `count_samples` would find, or None when some shard's count is unknown
    (for progress bars, which can run open-ended)."""
    try:
        return count_samples(urls, None, "samples")
    except ConfigError:
        return None


def shard_sample_count(url: str, sizes: dict[Path, dict] | None = None) -> int | None:
    """One shard's sample count from sizes.json, else from img2dataset's stats; None when
    neither knows it. `sizes` caches the sizes.json files read."""
    if not is_local(url):
        return None
    directory, name = os.path.split(url)
    sizes = {} if sizes is None else sizes
    sizes_path = Path(directory or ".") / "sizes.json"
    if sizes_path not in sizes:
        sizes[sizes_path] = _read_json_mapping(sizes_path) if sizes_path.is_file() else {}
    if name in sizes[sizes_path]:
        return int(sizes[sizes_path][name])
    stats_path = Path(directory or ".") / f"{name.split('.', 1)[0]}_stats.json"
    if stats_path.is_file():
        stats = _read_json_mapping(stats_path)
        if "successes" not in stats:
            raise ConfigError(f"{stats_path} has no 'successes' (not an img2dataset stats file?)")
        return int(stats["successes"])
    return None


def _read_json_mapping(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise ConfigError(f"{path} must be a JSON object")
    return value


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith(("pipe:", "file:"))

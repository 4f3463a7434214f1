"""CapFilt's bookkeeping: per-shard counts and score histograms, resume markers, the
settings a directory was made with, and the summary written once every shard is done.

    OUT/capfilt/settings.json   the settings (and model) of every shard in OUT
    OUT/capfilt/NAME.dropped.jsonl  the shard's images left without a caption, with candidates
    OUT/capfilt/NAME.json       one shard's counts; its presence marks the shard done
    OUT/capfilt.json            the summary: images and captions kept/dropped by kind, skips
    OUT/capfilt_scores.png      score histograms (original / synthetic, kept / removed)
    OUT/sizes.json              samples per output shard (what the loader counts epochs by)
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from vlp.atomic import atomic_write, atomic_write_json, atomic_write_text
from vlp.config import ConfigError
from vlp.data.sources import count_samples
from vlp.data.writer import write_sizes

SOURCES = ("original", "synthetic")
BINS = 50
SCORE_RANGE = {"itm": (0.0, 1.0), "itc": (-1.0, 1.0), "csls": (-1.0, 1.0)}  # the histogram's; csls clamps to it


def output_names(shards: list[str]) -> list[str]:
    """Each input shard's output name (its file name); two inputs with one name clash."""
    names = [Path(s).name for s in shards]
    seen: dict[str, str] = {}
    for shard, name in zip(shards, names):
        if name in seen:
            raise ValueError(f"two input shards share the file name {name!r} ({seen[name]} and {shard}); "
                             f"their outputs would overwrite each other")
        seen[name] = shard
    return names


def check_settings(out_dir: Path, settings: dict) -> None:
    """A resumed run (or another rank) must use the settings the directory's finished
    shards were made with. Before any shard is finished a rerun may change them (a first
    run that failed on, say, its batch size leaves nothing to be consistent with)."""
    path = out_dir / "capfilt" / "settings.json"
    if path.is_file() and _any_shard_done(out_dir):
        before = json.loads(path.read_text())
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"{out_dir} holds shards filtered with other settings ({detail}); "
                             f"use a new --out or the original settings")
    else:
        atomic_write_json(path, settings)


def _any_shard_done(out_dir: Path) -> bool:
    return any(p.name != "settings.json" for p in (out_dir / "capfilt").glob("*.json"))


def shard_done(out_dir: Path, name: str) -> bool:
    return (out_dir / name).is_file() and _stats_path(out_dir, name).is_file()


def known_size(shards: list[str]) -> Optional[int]:
    """Samples in `shards` from their sizes.json, for the progress bar; None if unknown."""
    try:
        return count_samples(shards, None, "shards") if shards else 0
    except (ConfigError, ValueError, OSError):
        return None


def new_stats(score: str) -> dict:
    return {"score": score,
            "images": {"read": 0, "written": 0, "dropped": 0},
            "captions": {s: {"candidates": 0, "kept": 0} for s in SOURCES},
            "histogram": {s: {"kept": [0] * BINS, "removed": [0] * BINS} for s in SOURCES},
            "skipped": {}}


def count(stats: dict, candidates: list[dict]) -> None:
    """Add one image's candidates (after the keep decision) to a shard's stats."""
    low, high = SCORE_RANGE[stats["score"]]
    kept_any = False
    for c in candidates:
        kind = stats["captions"][c["source"]]
        kind["candidates"] += 1
        kind["kept"] += c["kept"]
        kept_any |= c["kept"]
        slot = min(max(math.floor((c["score"] - low) / (high - low) * BINS), 0), BINS - 1)
        stats["histogram"][c["source"]]["kept" if c["kept"] else "removed"][slot] += 1
    stats["images"]["read"] += 1
    stats["images"]["written" if kept_any else "dropped"] += 1


def save_dropped(out_dir: Path, name: str, dropped: list[dict]) -> None:
    """The images of shard `name` left without a caption: {"key", "capfilt"} a line."""
    atomic_write_text(out_dir / "capfilt" / f"{name}.dropped.jsonl",
                      "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in dropped))


def save_shard_stats(out_dir: Path, name: str, stats: dict) -> None:
    atomic_write_json(_stats_path(out_dir, name), stats)


def merge_if_complete(out_dir: Path, names: list[str], settings: dict) -> Optional[dict]:
    """When every shard is done: sizes.json, capfilt.json and the histogram PNG (the same
    bytes whichever rank writes them); returns the summary. None while shards are missing."""
    if not all(shard_done(out_dir, n) for n in names):
        return None
    per_shard = {n: json.loads(_stats_path(out_dir, n).read_text()) for n in names}
    total = new_stats(settings["score"])
    for stats in per_shard.values():
        _add(total, stats)
    write_sizes(out_dir, {n: s["images"]["written"] for n, s in per_shard.items()})
    for kind in total["captions"].values():
        kind["removed"] = kind["candidates"] - kind["kept"]
    summary = {"shards": len(names), "images": total["images"], "captions": total["captions"],
               "skipped": total["skipped"], "settings": settings,
               "histogram": {"range": SCORE_RANGE[settings["score"]], "bins": BINS, **total["histogram"]}}
    if settings.get("threshold") == "auto":  # each shard's own split
        summary["thresholds"] = {n: s.get("threshold") for n, s in per_shard.items()}
    atomic_write_json(out_dir / "capfilt.json", summary)
    plot_histogram(summary, out_dir / "capfilt_scores.png")
    return summary


def plot_histogram(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist, settings = summary["histogram"], summary["settings"]
    low, high = hist["range"]
    edges = [low + (high - low) * i / hist["bins"] for i in range(hist["bins"] + 1)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharex=True)
    for ax, source in zip(axes, SOURCES):
        kept, removed = hist[source]["kept"], hist[source]["removed"]
        ax.stairs(removed, edges, fill=True, color="#d62728", alpha=0.6, label=f"removed ({sum(removed)})")
        ax.stairs(kept, edges, fill=True, color="#2ca02c", alpha=0.6, label=f"kept ({sum(kept)})")
        for threshold in _thresholds(summary):
            ax.axvline(threshold, color="black", linestyle="--", linewidth=1, alpha=0.4)
        ax.set_title(f"{source} captions")
        ax.set_xlabel(f"{settings['score'].upper()} score")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("captions")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


def _thresholds(summary: dict) -> list[float]:
    """The threshold line(s) to draw: the settings' number, or each shard's automatic one."""
    threshold = summary["settings"].get("threshold")
    if threshold == "auto":
        return sorted({t for t in summary["thresholds"].values() if t is not None})
    return [] if threshold is None else [threshold]


def _add(total: dict, stats: dict) -> None:
    for key in total["images"]:
        total["images"][key] += stats["images"][key]
    for source in SOURCES:
        for key in ("candidates", "kept"):
            total["captions"][source][key] += stats["captions"][source][key]
        for which in ("kept", "removed"):
            total["histogram"][source][which] = [
                a + b for a, b in zip(total["histogram"][source][which], stats["histogram"][source][which])]
    for reason, n in stats["skipped"].items():
        total["skipped"][reason] = total["skipped"].get(reason, 0) + n


def _stats_path(out_dir: Path, name: str) -> Path:
    return out_dir / "capfilt" / f"{name}.json"

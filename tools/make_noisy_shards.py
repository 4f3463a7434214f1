#!/usr/bin/env python3
"""Plant caption noise in shards: replace a fraction of all captions with a caption of
another image, and record which (for measuring a filter such as CapFilt).

    python tools/make_noisy_shards.py --fraction 0.4 --seed 0 'shards/demo/train-{000000..000007}.tar' OUT

Every caption of every sample (the .txt and each json `captions` entry) is one slot;
exactly round(fraction x slots) slots, chosen with `--seed`, get a caption drawn from a
different image, never one the sample already carries. Everything else is copied unchanged
(image bytes, other json fields, keys, shard names); a sample the loader could not use (no
image, no caption, bad json) and a damaged shard's tail are left out, counted in `skipped`.
Deterministic: the same input, fraction and seed give byte-identical output.

Writes OUT/NAME.tar for each input shard, OUT/sizes.json, and OUT/planted.jsonl: one line
per replaced caption, {"key", "slot" (0: the .txt, i: json captions[i-1]), "original",
"planted", "donor"}. `tools/capfilt_noise_report.py` scores a CapFilt run against it.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlp.atomic import atomic_write_text  # noqa: E402
from vlp.caption.capfilt_stats import output_names  # noqa: E402
from vlp.data.shard_reader import parsed_samples  # noqa: E402
from vlp.data.skips import SkipCounter  # noqa: E402
from vlp.data.sources import expand_spec  # noqa: E402
from vlp.data.writer import write_shard, write_sizes  # noqa: E402


def read_samples(shard: str, skips: SkipCounter) -> list[tuple[str, dict[str, bytes], list[str], dict]]:
    """(key, members, captions, json) of each usable sample; unusable ones (and a damaged
    shard's tail) are counted skips."""
    return [(s.key, s.contents, s.captions, s.meta) for s in parsed_samples(shard, skips)]


def plant(captions: list[list[str]], fraction: float, seed: int) -> list[dict]:
    """The replacements: {"image", "slot", "donor", "planted"} for round(fraction x slots)
    slots, each with a caption of another image that its image does not already carry."""
    if len(captions) < 2:
        raise ValueError("need at least two images to swap captions between")
    rng = random.Random(seed)
    slots = [(i, j) for i, caps in enumerate(captions) for j in range(len(caps))]
    chosen = sorted(rng.sample(slots, round(fraction * len(slots))))
    current = [list(c) for c in captions]
    out = []
    for image, slot in chosen:
        donor, text = _donation(captions, current[image], image, rng)
        current[image][slot] = text
        out.append({"image": image, "slot": slot, "donor": donor, "planted": text})
    return out


def _donation(captions: list[list[str]], carried: list[str], image: int, rng: random.Random,
              draws: int = 1000) -> tuple[int, str]:
    """A (donor, caption) of another image that `image` does not carry: random draws, then
    (on sets where few would do) the first one of them all; none at all is an error."""
    for _ in range(draws):
        donor = rng.randrange(len(captions))
        text = rng.choice(captions[donor])
        if donor != image and text not in carried:
            return donor, text
    for donor, texts in enumerate(captions):
        for text in texts:
            if donor != image and text not in carried:
                return donor, text
    raise ValueError(f"image {image} already carries every other image's captions: nothing to plant")


def noisy_sample(key: str, members: dict[str, bytes], captions: list[str], meta: dict) -> dict:
    out = {"__key__": key, **{ext: data for ext, data in members.items() if ext not in ("txt", "json")}}
    out["txt"] = captions[0]
    out["json"] = {**meta, "captions": captions[1:]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="shard spec ('dir/train-{000000..000007}.tar', '::' joins)")
    p.add_argument("out", type=Path)
    p.add_argument("--fraction", type=float, default=0.4, help="fraction of all captions replaced")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 0.0 <= args.fraction <= 1.0:
        p.error(f"--fraction must be in [0, 1], got {args.fraction}")
    try:
        shards = expand_spec(args.src, "src")
        names = output_names(shards)
    except (FileNotFoundError, ValueError) as err:
        print(f"make_noisy_shards: error: {err}", file=sys.stderr)
        return 2
    skips = SkipCounter()
    per_shard = [read_samples(s, skips) for s in shards]
    flat = [sample for samples in per_shard for sample in samples]
    try:
        replacements = plant([s[2] for s in flat], args.fraction, args.seed)
    except ValueError as err:
        print(f"make_noisy_shards: error: {err}", file=sys.stderr)
        return 2
    captions = [list(s[2]) for s in flat]
    lines = []
    for r in replacements:
        key = flat[r["image"]][0]
        lines.append({"key": key, "slot": r["slot"], "original": captions[r["image"]][r["slot"]],
                      "planted": r["planted"], "donor": flat[r["donor"]][0]})
        captions[r["image"]][r["slot"]] = r["planted"]
    sizes, at = {}, 0
    for name, samples in zip(names, per_shard):
        rows = [noisy_sample(key, members, captions[at + i], meta) for i, (key, members, _, meta) in enumerate(samples)]
        sizes[name] = write_shard(args.out / name, rows)
        at += len(samples)
    write_sizes(args.out, sizes)
    atomic_write_text(args.out / "planted.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    slots = sum(len(c) for c in captions)
    print(json.dumps({"images": len(flat), "captions": slots, "replaced": len(lines),
                      "images_all_replaced": _all_replaced(flat, lines), "skipped": dict(skips.total)}))
    return 0


def _all_replaced(flat, lines) -> int:
    count: dict[str, int] = {}
    for line in lines:
        count[line["key"]] = count.get(line["key"], 0) + 1
    return sum(count.get(key, 0) == len(caps) for key, _, caps, _ in flat)


if __name__ == "__main__":
    sys.exit(main())

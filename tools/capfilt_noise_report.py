#!/usr/bin/env python3
"""How well did CapFilt find planted noise? Scores a CapFilt output directory against the
planted.jsonl that tools/make_noisy_shards.py wrote.

    python tools/capfilt_noise_report.py --planted NOISY/planted.jsonl --filtered FILTERED

Reads every original caption's verdict (the `capfilt` lists of the output shards and of
capfilt/*.dropped.jsonl) and prints one JSON line: planted (wrong) captions removed /
total (`wrong_removed`, the filter's recall on the noise), right captions kept / total
(`right_kept`), the precision of the removals, and the same rates had the threshold been
each of `--sweep` instead (from the recorded scores; top-m and the empty-image rule are not
replayed there; the default sweep is on ITM's [0, 1] scale), and, on any score scale, at the thresholds that would keep each
`--right-kept` share of the right captions (`at_right_kept`: the filter target's operating
point).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlp.data.tar import member_extension, tar_samples  # noqa: E402


def verdicts(filtered: Path) -> list[tuple[str, dict]]:
    """(key, candidate) for every original caption CapFilt judged."""
    out = []
    for shard in sorted(filtered.glob("*.tar")):
        with open(shard, "rb") as stream:
            for key, entries in tar_samples(stream):
                for name, _, data in entries:
                    if member_extension(name) == "json":
                        meta = json.loads(data)
                        if "capfilt" not in meta:
                            raise ValueError(f"{shard} is not a CapFilt output ({key}.json has no 'capfilt' list): "
                                             f"--filtered takes the --out directory of pipelines/capfilt.py")
                        out += [(key, c) for c in meta["capfilt"] if c["source"] == "original"]
    for listing in sorted((filtered / "capfilt").glob("*.dropped.jsonl")):
        for line in listing.read_text().splitlines():
            row = json.loads(line)
            out += [(row["key"], c) for c in row["capfilt"] if c["source"] == "original"]
    return out


def rates(judged: list[tuple[bool, float, bool]]) -> dict:
    """judged: (planted, score, kept) per original caption."""
    wrong = [kept for planted, _, kept in judged if planted]
    right = [kept for planted, _, kept in judged if not planted]
    removed_wrong, removed_right = sum(not k for k in wrong), sum(not k for k in right)
    return {"wrong_removed": removed_wrong / max(len(wrong), 1),
            "right_kept": sum(right) / max(len(right), 1),
            "removal_precision": removed_wrong / max(removed_wrong + removed_right, 1)}


def at_right_kept(judged: list[tuple[bool, float, bool]], share: float) -> dict | None:
    """How well the scores separate, on any score scale: the threshold that keeps `share` of
    the right captions, and the rates there (read off the truth: it describes the filter,
    it is not a threshold to use)."""
    right = sorted(score for planted, score, _ in judged if not planted)
    if not right:
        return None
    dropped = int((1 - share) * len(right) + 1e-9)  # (1 - 0.9) * 10 is 0.999...
    threshold = right[min(dropped, len(right) - 1)]
    return {"threshold": threshold, **rates([(w, s, s >= threshold) for w, s, _ in judged])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--planted", required=True, type=Path)
    p.add_argument("--filtered", required=True, type=Path)
    p.add_argument("--sweep", type=float, nargs="*", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    p.add_argument("--right-kept", type=float, nargs="*", default=[0.9, 0.95],
                   help="also report the rates at the thresholds that keep these shares of the right captions")
    args = p.parse_args(argv)
    if not all(0.0 < share <= 1.0 for share in args.right_kept):
        p.error(f"--right-kept shares must be in (0, 1], got {args.right_kept}")
    try:
        planted = {(row["key"], row["planted"]) for row in map(json.loads, args.planted.read_text().splitlines())}
        judged = [((key, c["text"]) in planted, c["score"], c["kept"]) for key, c in verdicts(args.filtered)]
    except (OSError, ValueError, KeyError) as err:
        print(f"capfilt_noise_report: error: {err}", file=sys.stderr)
        return 2
    if not judged:
        print(f"capfilt_noise_report: no capfilt verdicts under {args.filtered}", file=sys.stderr)
        return 2
    found = sum(planted_ for planted_, _, _ in judged)
    report = {"original_captions": len(judged), "planted": len(planted), "planted_found": found,
              **rates(judged),
              "sweep": {str(t): rates([(w, s, s >= t) for w, s, _ in judged]) for t in args.sweep},
              "at_right_kept": {str(share): at_right_kept(judged, share) for share in args.right_kept}}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

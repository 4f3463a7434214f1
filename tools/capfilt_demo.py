#!/usr/bin/env python3
"""BLIP's CapFilt result in miniature: pretrain on noisy captions, CapFilt them with that
model, pretrain again on the filtered shards with the same budget, and compare with the
same budget on the clean shards, on the clean val set.

    python tools/capfilt_demo.py OUT --train 'shards/demo/train-{000000..000007}.tar' \
        --val 'shards/demo/val-{000000..000001}.tar' [--fraction 0.4] [--capfilt '--synthetic 1'] \
        -- train.steps=120 train.precision=fp32

Steps (each skipped when its output exists, so a rerun continues; every command is printed):
make_noisy_shards → pretrain clean → pretrain noisy → capfilt → capfilt_noise_report →
pretrain filtered. Pretraining uses the default config (configs/demo.yaml) plus the
overrides after `--`, the same for all three arms. Writes OUT/summary.json and prints
t2i R@1/R@10 (ITC) per arm, the share of the noise's R@10 loss the filtered run recovers,
and the filter's precision/recall on the planted captions.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def step(done: Path, command: list[str], log: Path | None = None) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in command), flush=True)
    if done.exists():
        print(f"  (done: {done} exists)", flush=True)
        return
    with open(log, "w") if log else open("/dev/null", "w") as sink:
        result = subprocess.run(command, cwd=REPO, stdout=sink if log else None,
                                stderr=subprocess.STDOUT if log else None)
    if result.returncode != 0:
        if log == done:  # a half-written report must not count as done
            done.unlink(missing_ok=True)
        raise SystemExit(f"failed ({result.returncode}): see {log or 'the output above'}")


def pretrain(out: Path, arm: str, train: str, val: str, overrides: list[str]) -> None:
    step(out / arm / "eval.json",
         [sys.executable, "pipelines/pretrain.py", f"data.train={train}", f"data.val={val}",
          f"output_dir={out / arm}", *overrides], out / f"{arm}.log")


def recalls(run: Path) -> dict:
    itc = json.loads((run / "eval.json").read_text())["itc"]
    return {"t2i_r1": itc["t2i_r1"], "t2i_r10": itc["t2i_r10"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--train", required=True, help="clean training shards (one directory, brace spec)")
    p.add_argument("--val", required=True, help="clean val shards")
    p.add_argument("--fraction", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--capfilt", default="", help="extra pipelines/capfilt.py flags, one string")
    p.add_argument("overrides", nargs="*", help="pretrain key=value overrides for all three arms")
    args = p.parse_intermixed_args(argv)  # overrides may follow the flags (after --)
    out = args.out.resolve()
    noisy = out / "noisy_shards"
    noisy_spec, filtered_spec = str(noisy / Path(args.train).name), str(out / "filtered_shards" / Path(args.train).name)
    step(noisy / "planted.jsonl", [sys.executable, "tools/make_noisy_shards.py", "--fraction", str(args.fraction),
                                   "--seed", str(args.seed), args.train, str(noisy)])
    pretrain(out, "clean", args.train, args.val, args.overrides)
    pretrain(out, "noisy", noisy_spec, args.val, args.overrides)
    step(out / "filtered_shards" / "capfilt.json",
         [sys.executable, "pipelines/capfilt.py", "--model", str(out / "noisy" / "model"), "--shards", noisy_spec,
          "--out", str(out / "filtered_shards"), *shlex.split(args.capfilt)], out / "capfilt.log")
    step(out / "filter_report.json",
         [sys.executable, "tools/capfilt_noise_report.py", "--planted", str(noisy / "planted.jsonl"),
          "--filtered", str(out / "filtered_shards")], out / "filter_report.json")
    pretrain(out, "filtered", filtered_spec, args.val, args.overrides)
    arms = {arm: recalls(out / arm) for arm in ("clean", "noisy", "filtered")}
    lost = arms["clean"]["t2i_r10"] - arms["noisy"]["t2i_r10"]
    report = json.loads((out / "filter_report.json").read_text().strip().splitlines()[-1])
    summary = {"arms": arms, "r10_lost_to_noise": lost,
               "r10_recovered_share": (arms["filtered"]["t2i_r10"] - arms["noisy"]["t2i_r10"]) / lost if lost else None,
               "filter": {k: report[k] for k in ("wrong_removed", "right_kept", "removal_precision")},
               "capfilt": json.loads((out / "filtered_shards" / "capfilt.json").read_text())["captions"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for arm, r in arms.items():
        print(f"{arm:<9} t2i R@1 {r['t2i_r1']:.3f}  R@10 {r['t2i_r10']:.3f}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

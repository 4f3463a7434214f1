#!/usr/bin/env python3
"""BLIP's CapFilt result in miniature: pretrain on noisy captions, CapFilt them with that
model, pretrain again on the filtered shards with the same budget, and compare with the
same budget on the clean shards, on the clean val set.

    python tools/capfilt_demo.py OUT --train 'shards/demo/train-{000000..000007}.tar' \
        --val 'shards/demo/val-{000000..000001}.tar' [--fraction 0.4] [--capfilt '--synthetic 1'] \
        -- train.steps=120 train.precision=fp32 loss.lm=1

Steps (each skipped when its output exists, so a rerun continues; every command is printed):
make_noisy_shards → pretrain clean → pretrain noisy [→ pretrain judge] → capfilt →
capfilt_noise_report → pretrain filtered. A pretraining arm that was interrupted resumes
from its newest checkpoint (or starts again when it saved none). A finished step is not
redone when the flags change: use a new OUT for new flags. Pretraining uses the default config
(configs/demo.yaml) plus the overrides after `--`, the same for every arm; synthetic
captions need a captioner in the model that filters (`loss.lm=1`: the config trains ITC
alone), ITM's filter `loss.itm=1`. Writes OUT/summary.json and prints t2i R@1/R@10 (ITC)
per arm, the share of the noise's R@10 loss the filtered run recovers, and the filter's
precision/recall on the planted captions.

--judge-overrides trains one more arm on the noisy shards, `judge`, with these overrides
added, and round 1 filters with it instead of the noisy arm: the small-loss trick and a
captioner (`'loss.itc.drop_hardest=0.3 loss.lm=1'`) make a better judge of noisy captions
but a worse model of clean ones (docs/training.md, CapFilt). The noisy arm stays the
plain recipe on the noisy shards, so the R@10 the noise costs, and the share the filtered
arm recovers, are measured against the recipe the other arms train.

--rounds N bootstraps: round k > 1 filters the noisy shards again with the model trained on
round k-1's output (`--capfilt` flags, then `--refilter`'s: by default no new synthetic
captions), then pretrains on them (arm `filtered_round{k}`); each round is reported.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlp.atomic import atomic_write_json  # noqa: E402
from vlp.caption.capfilt import CapFiltSettings  # noqa: E402
from vlp.config import ConfigError, load_config  # noqa: E402
from vlp.model.vlp_model import enabled_objectives  # noqa: E402
from vlp.train.rundir import earlier_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"  # pipelines/pretrain.py's default


def step(done: Path, command: list[str], log: Path | None = None) -> None:
    """Run `command` unless `done` exists. When the log is the done marker (a report), it is
    written aside and renamed on success: an interrupted report must not count as done."""
    print("$ " + " ".join(shlex.quote(c) for c in command), flush=True)
    if done.exists():
        print(f"  (done: {done} exists)", flush=True)
        return
    sink_path = done.with_name(done.name + ".part") if log == done else log
    with open(sink_path, "w") if log else open("/dev/null", "w") as sink:
        result = subprocess.run(command, cwd=REPO, stdout=sink if log else None,
                                stderr=subprocess.STDOUT if log else None)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): see {sink_path or 'the output above'}")
    if log == done:
        sink_path.replace(done)


def pretrain(out: Path, arm: str, train: str, val: str, overrides: list[str]) -> None:
    step(out / arm / "eval.json",
         [sys.executable, "pipelines/pretrain.py", f"data.train={train}", f"data.val={val}",
          f"output_dir={out / arm}", *overrides, *continuation(out / arm)], out / f"{arm}.log")


def continuation(run: Path) -> list[str]:
    """How to rerun an arm that an interruption left unfinished: from its newest checkpoint,
    or from the start when it saved none (the run directory refuses a plain rerun)."""
    found = earlier_run(run)  # "checkpoints/" is listed only when it holds one
    if not found:
        return []
    return ["train.resume=auto"] if "checkpoints/" in found else ["train.overwrite=true"]


def check_judge(overrides: list[str], capfilt_flags: list[str]) -> None:
    """Refuse, before any training, a filter the judging model cannot run: synthetic
    captions need its captioner (loss.lm), ITM scores its fusion head (loss.itm)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--synthetic", type=int, default=CapFiltSettings.synthetic)
    parser.add_argument("--score", default=CapFiltSettings.score)
    flags, _ = parser.parse_known_args(capfilt_flags)
    try:
        cfg = load_config(DEMO_CONFIG, overrides)
        trained = {objective.name for objective in enabled_objectives(cfg.model, cfg.loss)}
    except ConfigError as err:
        raise SystemExit(f"capfilt_demo: error: {err}") from None
    if flags.synthetic and "lm" not in trained:
        raise SystemExit(f"capfilt_demo: error: --synthetic {flags.synthetic} (CapFilt's default) needs a captioner "
                         f"in the judging model: add loss.lm=1 to the overrides (or --judge-overrides), "
                         f"or filter alone with --capfilt '--synthetic 0'")
    if flags.score == "itm" and "itm" not in trained:
        raise SystemExit("capfilt_demo: error: --score itm needs an ITM head in the judging model: add loss.itm=1 "
                         "to the overrides (or --judge-overrides), or score with csls / itc")


def recalls(run: Path) -> dict:
    itc = json.loads((run / "eval.json").read_text())["itc"]
    return {"t2i_r1": itc["t2i_r1"], "t2i_r10": itc["t2i_r10"]}


def capfilt_round(out: Path, k: int, model: Path, args, flags: list[str]) -> dict:
    """Filter the noisy shards with `model`, score the filter on the planted captions and
    pretrain on what it kept. Round 1 keeps the names of the single-round layout."""
    noisy, pattern = out / "noisy_shards", Path(args.train).name
    shards = out / ("filtered_shards" if k == 1 else f"round{k}_shards")
    report_path = out / ("filter_report.json" if k == 1 else f"filter_report_round{k}.json")
    arm = "filtered" if k == 1 else f"filtered_round{k}"
    step(shards / "capfilt.json",
         [sys.executable, "pipelines/capfilt.py", "--model", str(model), "--shards", str(noisy / pattern),
          "--out", str(shards), *flags], out / ("capfilt.log" if k == 1 else f"capfilt_round{k}.log"))
    step(report_path, [sys.executable, "tools/capfilt_noise_report.py", "--planted", str(noisy / "planted.jsonl"),
                       "--filtered", str(shards)], report_path)
    pretrain(out, arm, str(shards / pattern), args.val, args.overrides)
    report = json.loads(report_path.read_text().strip().splitlines()[-1])
    return {"round": k, "arm": arm, "model": str(model), "flags": flags,
            "filter": {key: report[key] for key in ("wrong_removed", "right_kept", "removal_precision")},
            "capfilt": json.loads((shards / "capfilt.json").read_text())["captions"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--train", required=True, help="clean training shards (one directory, brace spec)")
    p.add_argument("--val", required=True, help="clean val shards")
    p.add_argument("--fraction", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the planted noise (training seeds are overrides: data.seed=K train.seed=K)")
    p.add_argument("--capfilt", default="", help="extra pipelines/capfilt.py flags, one string")
    p.add_argument("--rounds", type=int, default=1, help="CapFilt rounds (each one more pretraining run)")
    p.add_argument("--refilter", default="--synthetic 0",
                   help="flags added to --capfilt's in rounds after the first")
    p.add_argument("--judge-overrides", default="",
                   help="train a separate judge for round 1 on the noisy shards with these pretrain overrides "
                        "added, one string (e.g. 'loss.itc.drop_hardest=0.3 loss.lm=1')")
    p.add_argument("overrides", nargs="*", help="pretrain key=value overrides for every arm")
    args = p.parse_intermixed_args(argv)  # overrides may follow the flags (after --)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    if "::" in args.train:
        p.error("--train must be one directory's shards (a brace spec), not a '::' list")
    check_judge(args.overrides + shlex.split(args.judge_overrides), shlex.split(args.capfilt))
    out = args.out.resolve()
    noisy = out / "noisy_shards"
    noisy_spec = str(noisy / Path(args.train).name)
    step(noisy / "planted.jsonl", [sys.executable, "tools/make_noisy_shards.py", "--fraction", str(args.fraction),
                                   "--seed", str(args.seed), args.train, str(noisy)])
    pretrain(out, "clean", args.train, args.val, args.overrides)
    pretrain(out, "noisy", noisy_spec, args.val, args.overrides)
    judge = "judge" if args.judge_overrides else "noisy"
    if args.judge_overrides:
        pretrain(out, judge, noisy_spec, args.val, args.overrides + shlex.split(args.judge_overrides))
    rounds, model = [], out / judge / "model"
    for k in range(1, args.rounds + 1):
        flags = shlex.split(args.capfilt) + (shlex.split(args.refilter) if k > 1 else [])
        rounds.append(capfilt_round(out, k, model, args, flags))
        model = out / rounds[-1]["arm"] / "model"
    arms = {arm: recalls(out / arm) for arm in dict.fromkeys(("clean", "noisy", judge, *(r["arm"] for r in rounds)))}
    lost = arms["clean"]["t2i_r10"] - arms["noisy"]["t2i_r10"]
    for r in rounds:
        r["r10_recovered_share"] = (arms[r["arm"]]["t2i_r10"] - arms["noisy"]["t2i_r10"]) / lost if lost else None
    first = rounds[0]
    summary = {"arms": arms, "r10_lost_to_noise": lost, "r10_recovered_share": first["r10_recovered_share"],
               "filter": first["filter"], "capfilt": first["capfilt"], "rounds": rounds}
    atomic_write_json(out / "summary.json", summary)
    for arm, r in arms.items():
        print(f"{arm:<17} t2i R@1 {r['t2i_r1']:.3f}  R@10 {r['t2i_r10']:.3f}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pretrain a vlp model.

    deepspeed pipelines/pretrain.py                          # the demo: configs/demo.yaml on shards/demo/
    deepspeed pipelines/pretrain.py --config configs/base.yaml train.steps=1000 output_dir=runs/x
    deepspeed --num_accelerators 2 pipelines/pretrain.py ... # 2 ranks on a CPU machine
    deepspeed --num_gpus 8 pipelines/pretrain.py ...         # GPUs; --hostfile for several nodes
    torchrun --nproc_per_node 2 pipelines/pretrain.py ...
    python pipelines/pretrain.py ...                         # one process, no launcher

Overrides are dotted `key=value` pairs (data.train=SPEC, data.val=SPEC, train.steps=N,
train.eval_every=N, output_dir=DIR, ...), before or after the flags. `--resume` continues from the newest checkpoint
in OUTPUT_DIR/checkpoints (same as train.resume=auto).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlp.config import ConfigError, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument("--deepspeed_config", help="a full DeepSpeed JSON that overrides the generated one")
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    # Intermixed: flags and overrides in any order (`... --resume train.steps=35`).
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.resume:
        overrides.append("train.resume=auto")
    if args.deepspeed_config:
        overrides.append(f"train.deepspeed_config={args.deepspeed_config}")
    from vlp.train.checkpoint import CheckpointError

    try:
        cfg = load_config(args.config, overrides)
        from vlp.train.loop import pretrain
        pretrain(cfg)
    except (ConfigError, FileNotFoundError, CheckpointError) as err:
        print(f"pretrain: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

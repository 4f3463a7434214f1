r"""Zero-shot image classification with an exported vlp model directory.

    python pipelines/zeroshot.py --model runs/demo/model --images 'shards/demo/val-*.tar' \
        --label-field group --classes configs/demo_classes.txt

Writes predictions.csv, metrics.json, confusion.png and mistakes.png under --out and prints
a one-line JSON summary (top1, top5, mean_per_class, n) last on stdout.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from vlp.config import ConfigError
from vlp.zeroshot.classifier import SCORINGS
from vlp.zeroshot.errors import ZeroShotError
from vlp.zeroshot.run import ZeroShotOptions, run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (config.yaml, model.safetensors, tokenizer/)")
    p.add_argument("--images", required=True, nargs="+",
                   help="ImageFolder tree, shards ('dir/val-*.tar', braces ok), a folder, image files, "
                        "a text file listing images, or one image")
    p.add_argument("--classes", required=True, help="text file (one class a line) or json {label: display name}")
    p.add_argument("--templates", default="simple",
                   help="simple | imagenet80 | none | learned:PATH | a text file with {} (default: simple)")
    p.add_argument("--label-field", default=None, help="json field holding the label in shards")
    p.add_argument("--scoring", choices=SCORINGS, default="itc")
    p.add_argument("--itm-k", type=int, default=5, help="classes reranked by the matching head (--scoring itm)")
    p.add_argument("--out", default="runs/zeroshot", help="report directory (default: runs/zeroshot)")
    p.add_argument("--cache-dir", default=None, help="class-embedding cache (default: OUT/cache)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--tune-prompts", type=int, default=0, metavar="N",
                   help="CoOp: learn context vectors on N labelled shots per class, evaluate on the rest")
    p.add_argument("--n-ctx", type=int, default=4, help="CoOp: number of context vectors M")
    p.add_argument("--tune-steps", type=int, default=300)
    p.add_argument("--tune-lr", type=float, default=2e-3)
    p.add_argument("--prompt-out", default=None, help="CoOp: where to save the vectors (default: next to the model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = ZeroShotOptions(
        model=args.model, images=args.images, classes=args.classes, templates=args.templates,
        out=args.out, label_field=args.label_field, scoring=args.scoring, itm_k=args.itm_k,
        batch_size=args.batch_size, cache_dir=args.cache_dir, progress=not args.quiet,
        tune_prompts=args.tune_prompts, n_ctx=args.n_ctx, tune_steps=args.tune_steps,
        tune_lr=args.tune_lr, prompt_out=args.prompt_out, seed=args.seed)
    try:
        metrics = run(opts)
    except (ZeroShotError, ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = {k: metrics.get(k) for k in ("top1", "top5", "mean_per_class", "n")}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

r"""Foil evaluation: does a model pick the true caption over captions with the same words
and another meaning (and, where a test lists foil images, the true image)?

    python pipelines/foils.py --model runs/demo/model --foils relations/foils.jsonl \
        [--images ROOT] [--out runs/foils]

Reads jsonl (or .json) tests in vlp's, SugarCrepe's, ARO's or Winoground's field names
(docs/foils.md). Writes foils.json and foils.png under --out, prints a table and, last,
one JSON line: {"n", "chance", "itc", "filip", "itm", "rerank", "by_type"} (scorers the
model has no head for are left out).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from vlp.config import ConfigError
from vlp.foils import FoilOptions, FoilsError, run
from vlp.foils.report import format_table, summary_line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (config.yaml, model.safetensors, tokenizer/)")
    p.add_argument("--foils", required=True, help="jsonl (one test a line) or .json list / {id: test}")
    p.add_argument("--images", default=None, help="folder relative image paths resolve against "
                                                  "(default: the foils file's folder)")
    p.add_argument("--out", default="runs/foils", help="report directory (default: runs/foils)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = FoilOptions(model=args.model, foils=args.foils, images=args.images, out=args.out,
                       batch_size=args.batch_size, device=args.device, progress=not args.quiet)
    try:
        report = run(opts)
    except (FoilsError, ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(report))
    print(json.dumps(summary_line(report)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

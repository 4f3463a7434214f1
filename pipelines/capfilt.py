"""CapFilt (BLIP's caption bootstrapping) on WebDataset shards: caption every image, score
every original and synthetic caption (by default ITC's CSLS; or the ITM head, BLIP's filter,
or the plain ITC cosine), keep the matched ones, and write filtered shards in img2dataset layout.

    python pipelines/capfilt.py --model runs/noisy/model --shards 'data/train-{000000..000007}.tar' \
        --out data/filtered [--synthetic 1] [--score csls|itc|itm] [--threshold auto|NUMBER] \
        [--top-m 0] [--empty likely|best|drop]

The defaults (CSLS scores, a mixture threshold per shard, an image whose captions all fall
short keeps its best one only when it scores at least halfway from the mixture's low mean
to the threshold) are the
filter that worked at CPU budgets on two development sets; BLIP's own filter is
`--score itm --threshold 0.5 --empty drop`.

Several processes split the shards (`--rank R --world W`, or the RANK/WORLD_SIZE a launcher
such as torchrun sets) into one --out; the last to finish writes the summary. A killed run
resumes where it stopped (finished shards are skipped). Prints the summary as one JSON line
last; see vlp/caption/capfilt.py for the output layout.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from vlp.config import ConfigError


def threshold_arg(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    from vlp.caption.capfilt import EMPTY, CapFiltSettings

    default = CapFiltSettings()  # one source for the defaults of the flags and of the API
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (config.yaml, model.safetensors, tokenizer/)")
    p.add_argument("--shards", required=True, help="shard spec, e.g. 'dir/train-{000000..000009}.tar' ('::' joins)")
    p.add_argument("--out", required=True, help="output directory (created; reused to resume)")
    p.add_argument("--synthetic", type=int, default=default.synthetic, help="nucleus captions per image (BLIP: 1)")
    p.add_argument("--top-p", type=float, default=default.top_p)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's decoder.max_new_tokens")
    p.add_argument("--score", choices=("itm", "itc", "csls"), default=default.score,
                   help="itm: match probability in [0, 1]; itc: cosine similarity in [-1, 1]; csls: the cosine "
                        "corrected for hubness within the shard, 2cos(i,t) - r(t) - r(i) (r: mean cosine to the "
                        "k nearest images / captions)")
    p.add_argument("--csls-k", type=int, default=default.csls_k, help="csls: neighbours per caption and per image")
    p.add_argument("--threshold", type=threshold_arg, default=default.threshold,
                   help="keep captions scoring at least this; 'auto': per shard, where a two-Gaussian mixture "
                        "fitted to its original captions' scores splits them (for --score csls)")
    p.add_argument("--no-threshold", action="store_true", help="no threshold: keep the --top-m best")
    p.add_argument("--top-m", type=int, default=default.top_m, help="keep at most the m best captions per image (0: no cap)")
    p.add_argument("--empty", choices=EMPTY, default=default.empty,
                   help="an image with no caption kept: drop it, keep its best caption, or (likely; with "
                        "--threshold auto) keep its best when it lies above the midpoint of the mixture's "
                        "low mean and the threshold")
    p.add_argument("--seed", type=int, default=default.seed, help="nucleus sampling seed (mixed with each shard's name)")
    p.add_argument("--batch-size", type=int, default=default.batch_size)
    p.add_argument("--rank", type=int, default=None, help="this process's share: shards[rank::world] (default: $RANK or 0)")
    p.add_argument("--world", type=int, default=None, help="number of processes (default: $WORLD_SIZE or 1)")
    p.add_argument("--device", default=None, help="default: cuda:$LOCAL_RANK when a GPU is present, else cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = run(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"capfilt: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary_line(summary)))
    return 0


def settings_from(args):
    from vlp.caption.capfilt import CapFiltSettings

    return CapFiltSettings(synthetic=args.synthetic, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                           score=args.score, csls_k=args.csls_k, threshold=None if args.no_threshold else args.threshold,
                           top_m=args.top_m, empty=args.empty, seed=args.seed, batch_size=args.batch_size)


def run(args) -> dict:
    import torch

    from vlp.caption.capfilt import CapFilt
    from vlp.data.sources import expand_spec
    from vlp.model import load_model_dir

    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", 0))
    world = args.world if args.world is not None else int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ValueError(f"--rank must be in [0, --world); got rank {rank}, world {world}")
    settings = settings_from(args)
    settings.check()
    shards = expand_spec(args.shards, "--shards")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    model, cfg, tokenizer = load_model_dir(args.model, device)
    capfilt = CapFilt(model, tokenizer, cfg.data, settings, device)
    return capfilt.run(shards, Path(args.out), rank, world, model_name=str(Path(args.model).resolve()))


def summary_line(summary: dict) -> dict:
    """The summary without its histogram (that is in capfilt.json and the PNG)."""
    return {k: v for k, v in summary.items() if k != "histogram"}


if __name__ == "__main__":
    sys.exit(main())

"""Embed shards and build a tuned FAISS index.

    python pipelines/build_index.py --model MODEL_DIR --shards 'shards/demo/val-{000000..000001}.tar' --out runs/index

Several processes can embed disjoint shard subsets into one --out (`--stage embed --rank R
--world W`), then one `--stage index` merges their chunks (add `--merge DIR...` for chunks
written to other directories). A killed run resumes from its last finished chunk. An --out
that holds another model's or another shard list's chunks is refused (`--append` adds shards
to it), and so is a non-empty directory that is not an index build.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from vlp.config import ConfigError


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: '{text}' (e.g. 512M, 4G)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (save_model_dir / export_model.py output)")
    p.add_argument("--shards", help="shard spec, e.g. 'dir/train-{000000..000009}.tar' ('::' joins specs)")
    p.add_argument("--out", required=True, help="index directory (created; reused to resume)")
    p.add_argument("--stage", choices=("all", "embed", "index"), default="all")
    p.add_argument("--rank", type=int, default=0, help="this process's share: shards[rank::world]")
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--merge", nargs="*", default=[], type=Path, help="other directories whose chunks join the index")
    p.add_argument("--append", action="store_true",
                   help="add --shards to an existing --out built from other shards (same model and settings)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=10_000, help="samples per resumable chunk")
    p.add_argument("--fp32", action="store_true", help="store embeddings as float32 (default float16)")
    p.add_argument("--filip-tokens", type=int, default=16, help="FILIP tokens kept per image (0 none, -1 all)")
    p.add_argument("--no-captions", action="store_true", help="embed images only (no --eval; tunes on image queries)")
    p.add_argument("--factory", help="FAISS factory string; overrides the automatic choice")
    p.add_argument("--memory-budget", type=parse_size, help="index RAM budget, e.g. 2G (picks PQ when exceeded)")
    p.add_argument("--target-recall", type=float, default=0.95,
                   help="recall@10 the index must reach on held-out queries that tuning did not see")
    p.add_argument("--tuning-margin", type=float, default=0.01,
                   help="tune nprobe/efSearch to target + margin, so fresh queries still reach the target")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"build_index: error: {err}", file=sys.stderr)
        return 2


def run(args) -> int:
    from vlp.data.sources import expand_spec
    from vlp.retrieval.build import build_index_dir
    from vlp.retrieval.embed import EmbedSettings, embed_shards
    from vlp.retrieval.encoder import Encoder

    if not 0 <= args.rank < args.world:
        raise ValueError(f"--rank must be in [0, --world); got rank {args.rank}, world {args.world}")
    if args.stage in ("all", "embed"):
        if not args.model or not args.shards:
            raise ValueError("--model and --shards are required to embed")
        shards = expand_spec(args.shards, "--shards")
        settings = EmbedSettings(model=str(Path(args.model).resolve()), batch_size=args.batch_size,
                                 chunk_size=args.chunk_size, fp16=not args.fp32, filip_tokens=args.filip_tokens,
                                 captions=not args.no_captions)
        encoder = Encoder(settings.model, threads=args.threads or None)
        counts = embed_shards(encoder, shards, Path(args.out), settings, args.rank, args.world,
                              append=args.append)
        print(json.dumps({"embed": counts}))
    if args.stage in ("all", "index"):
        model = args.model or _model_of(Path(args.out))
        manifest = build_index_dir(Path(args.out), str(Path(model).resolve()), args.factory,
                                   args.memory_budget, args.merge, args.target_recall,
                                   tuning_margin=args.tuning_margin)
        print(json.dumps({"index": {"count": manifest.count, "factory": manifest.factory,
                                    "search_params": manifest.search_params,
                                    "recall_at_10": manifest.recall_at_10}}))
    return 0


def _model_of(out: Path) -> str:
    build = out / "build.json"
    if not build.is_file():
        raise FileNotFoundError(f"{build} not found: pass --model or embed into {out} first")
    return json.loads(build.read_text())["model"]


if __name__ == "__main__":
    sys.exit(main())

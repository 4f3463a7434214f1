"""Query a built index, or evaluate it.

    python pipelines/search.py --index runs/index --text "a red apple" -k 10 [--rerank filip|itm]
    python pipelines/search.py --index runs/index --image photo.jpg -k 10
    python pipelines/search.py --index runs/index --eval

Prints a JSON list of results, best first: id, score, key, caption, index_score (the
index's own score) and, after a rerank, rerank_score; score is then s_itc·index_score +
log rerank_score (ITM) or + s_filip·rerank_score (FILIP), vlp.metrics.rerank_score.
--eval prints R@1/5/10.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, help="index directory from build_index.py")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="text query (text → image)")
    query.add_argument("--image", help="image file (image → image)")
    query.add_argument("--eval", action="store_true", help="R@1/5/10 over the index's own image-caption pairs")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--rerank", choices=("filip", "itm"), help="with --eval: only this rerank (default both)")
    p.add_argument("--candidates", type=int, default=16, help="index candidates a rerank reorders")
    p.add_argument("--model", help="model directory (default: the one in the index manifest)")
    p.add_argument("--eval-limit", type=int, default=5000)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.k < 1:
        p.error("-k must be >= 1")
    from vlp.retrieval.search import StoreError

    try:
        print(json.dumps(run(args), indent=2, ensure_ascii=False))
    except (FileNotFoundError, ValueError, StoreError) as err:
        print(f"search: error: {err}", file=sys.stderr)
        return 2
    return 0


def run(args):
    from vlp.retrieval.encoder import Encoder
    from vlp.retrieval.evaluate import evaluate
    from vlp.retrieval.search import Searcher

    searcher = Searcher(args.index, rerank_candidates=max(args.candidates, args.k))
    if args.model:
        searcher._encoder = Encoder(args.model)
    if args.eval:
        reranks = (args.rerank,) if args.rerank else ("filip", "itm")
        return evaluate(searcher, candidates=args.candidates, limit=args.eval_limit, rerank=reranks)
    if args.text is not None:
        if not args.text.strip():
            raise ValueError("--text is empty")
        hits = searcher.search_text(args.text, args.k, args.rerank)
    else:
        path = Path(args.image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        hits = searcher.search_image(searcher.encoder.decode(path.read_bytes()), args.k, args.rerank)
    return [h.as_dict() for h in hits]


if __name__ == "__main__":
    sys.exit(main())

"""Serve an index over HTTP (FastAPI + uvicorn); the search page is at /, the API docs at /docs.

    python pipelines/serve.py --index runs/index --port 8000
"""
from __future__ import annotations

import argparse
import logging
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-k", type=int, default=100)
    p.add_argument("--max-body", type=int, default=4 << 20, help="largest request body in bytes")
    p.add_argument("--max-image-pixels", type=int, default=40_000_000,
                   help="largest image query in pixels to decode, checked from its header (413 over it)")
    p.add_argument("--max-decodes", type=int, default=2, help="image queries decoded at the same time")
    p.add_argument("--candidates", type=int, default=32, help="index candidates a rerank reorders")
    p.add_argument("--no-model", action="store_true",
                   help="serve embedding queries only, without loading the index's model")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import torch
    import uvicorn

    from vlp.retrieval.search import Searcher
    from vlp.retrieval.service import create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        searcher = Searcher(args.index, rerank_candidates=args.candidates)
        if not args.no_model:
            searcher.encoder  # load now: a missing model directory fails here, not per request
    except (FileNotFoundError, ValueError) as err:
        print(f"serve: error: {err}", file=sys.stderr)
        return 2
    app = create_app(searcher, max_k=args.max_k, max_body_bytes=args.max_body,
                     max_image_pixels=args.max_image_pixels, max_decodes=args.max_decodes)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())

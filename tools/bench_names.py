"""Does the index answer the names of what it holds? Every item's own short name (a json
field, or its first caption) is sent as a text query; a name counts as found when an item
carrying that name is in the top k. This is what a newcomer tries first on the search page
("dog", "spoon"), and what retrieval recall over long captions does not show.

    python tools/bench_names.py --index runs/demo/index [--field name] [--max-words 2] [-k 5] \\
        [--rerank itm|filip] [--json out.json]

Names are compared lower-cased with surrounding whitespace removed; items sharing a name
form one query (a hit on any of them counts). Prints hit rates at 1 and k, a sample of the
misses with what came first instead, and last one JSON line:
{"n", "top1", "topk", "k", "field", "max_words", "rerank"}.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def item_names(searcher, field: str | None) -> list[str]:
    """Each item's name, in row order: json[field] when present and a string, else its
    first caption."""
    table = searcher.items.table
    metas = table.column("json").to_pylist() if field and "json" in table.column_names else [None] * len(table)
    names = []
    for row, raw in enumerate(metas):
        value = json.loads(raw).get(field) if raw else None
        if not isinstance(value, str):
            captions = searcher.items.captions(row)
            value = captions[0] if captions else ""
        names.append(value)
    return names


def short_names(searcher, field: str | None, max_words: int) -> dict[str, set[int]]:
    """{name: item ids carrying it} for names of 1..max_words words."""
    names: dict[str, set[int]] = defaultdict(set)
    for item_id, raw in zip(searcher.items.ids, item_names(searcher, field)):
        name = " ".join(raw.lower().split())
        if name and len(name.split()) <= max_words:
            names[name].add(int(item_id))
    return dict(names)


def name_recall(searcher, names: dict[str, set[int]], k: int, rerank: str | None = None,
                batch: int = 256) -> dict:
    """Hit rates of the names at 1 and k, and each name's top ids."""
    queries = sorted(names)
    tops: dict[str, list[int]] = {}
    if rerank is None:
        for start in range(0, len(queries), batch):
            chunk = queries[start:start + batch]
            vectors = searcher.encoder.text_embeddings(chunk)
            _, ids = searcher.search_vectors(np.asarray(vectors, np.float32), k)
            tops.update({name: [int(i) for i in row if i >= 0] for name, row in zip(chunk, ids)})
    else:
        for name in queries:
            tops[name] = [hit.id for hit in searcher.search_text(name, k, rerank=rerank)]
    hit1 = [bool(tops[n]) and tops[n][0] in names[n] for n in queries]
    hitk = [any(i in names[n] for i in tops[n]) for n in queries]
    return {"n": len(queries), "top1": float(np.mean(hit1)) if queries else 0.0,
            "topk": float(np.mean(hitk)) if queries else 0.0, "tops": tops,
            "misses": [n for n, ok in zip(queries, hitk) if not ok]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", type=Path, required=True)
    p.add_argument("--field", default="name", help="json field holding the name ('' = first caption)")
    p.add_argument("--max-words", type=int, default=2)
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--rerank", choices=("itm", "filip"), default=None)
    p.add_argument("--json", type=Path, help="write the full report (every name's top ids) here")
    args = p.parse_args(argv)
    from vlp.retrieval.search import Searcher

    searcher = Searcher(args.index)
    names = short_names(searcher, args.field or None, args.max_words)
    if not names:
        raise SystemExit(f"error: no item of {args.index} has a name of at most {args.max_words} words")
    report = name_recall(searcher, names, args.k, args.rerank)
    first_caption = dict(zip((int(i) for i in searcher.items.ids), item_names(searcher, None)))
    print(f"{report['n']} names of <= {args.max_words} words: top-1 {report['top1']:.3f}, "
          f"top-{args.k} {report['topk']:.3f}")
    for name in report["misses"][:15]:
        shown = ", ".join(repr(first_caption[i]) for i in report["tops"][name][:3])
        print(f"  miss: {name!r} -> {shown}")
    if args.json:
        args.json.write_text(json.dumps({**vars(args), "index": str(args.index), "json": str(args.json), **report},
                                        indent=1))
    summary = {key: report[key] for key in ("n", "top1", "topk")}
    print(json.dumps({**summary, "k": args.k, "field": args.field, "max_words": args.max_words,
                      "rerank": args.rerank}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

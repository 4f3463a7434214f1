"""Caption images with an exported vlp model directory (its captioning decoder), and score
the captions of shard images against their references.

    python pipelines/caption.py --model runs/demo/model --images photo.jpg some/folder
    python pipelines/caption.py --model runs/demo/model --shards 'shards/demo/val-{000000..000001}.tar' \
        --eval [--method beam|greedy|nucleus] [--num-beams 3] [--out runs/captions.jsonl]

Prints one JSON line per image ({"image" or "key", "caption"[, "references"]}), or, with
--out, writes them there (atomically) plus an HTML contact sheet beside it (same name,
.html). With --eval (shards only: their captions are the references), the last line printed
is one JSON object: n, bleu1..4, rougeL, cider, meteor (with a Java runtime) and the
tokenizer used (vlp/caption/metrics.py). Unreadable images are counted skips.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


def image_paths(specs: list[str]) -> list[Path]:
    paths = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"--images: no such file or directory: {path}")
    if not paths:
        raise FileNotFoundError(f"--images: no image files in {' '.join(specs)}")
    return paths


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory (config.yaml, model.safetensors, tokenizer/)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", help="image files and/or folders")
    source.add_argument("--shards", help="shard spec, e.g. 'dir/val-{000000..000009}.tar' ('::' joins)")
    p.add_argument("--eval", action="store_true", help="score the captions against the shards' captions")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (a Java start of ~10-40 s)")
    p.add_argument("--method", choices=("beam", "greedy", "nucleus"), default="beam")
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: model.decoder.max_new_tokens")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="nucleus sampling seed")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--sheet-limit", type=int, default=500, help="images on the HTML contact sheet")
    p.add_argument("--out", default=None, help="JSONL output file (default: stdout); the sheet goes beside it")
    args = p.parse_args(argv)
    if args.eval and not args.shards:
        p.error("--eval needs --shards (their captions are the references)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from vlp.config import ConfigError
    from vlp.model import load_model_dir

    try:
        model, cfg, tokenizer = load_model_dir(args.model)
        if model.decoder is None:
            raise ValueError(f"{args.model} has no captioning decoder (trained with loss.lm: 0)")
        rows, sheet, skipped = (caption_shards if args.shards else caption_files)(args, model, cfg, tokenizer)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_rows(args.out, rows, sheet)
    print(f"captioned {len(rows)} images, skipped {skipped}", file=sys.stderr)
    if args.eval and rows:
        print(json.dumps(score(rows, meteor=not args.no_meteor, method=args.method)))
    return 0 if rows else 1


def generation_options(args) -> dict:
    options = {"method": args.method, "max_new_tokens": args.max_new_tokens}
    if args.method == "beam":
        options["num_beams"] = args.num_beams
    if args.method == "nucleus":
        options.update(top_p=args.top_p, temperature=args.temperature,
                       generator=torch.Generator().manual_seed(args.seed))
    return options


def caption_files(args, model, cfg, tokenizer):
    from vlp.caption.evaluate import generate_captions
    from vlp.caption.sheet import ContactSheet
    from vlp.data import load_image

    paths, options = image_paths(args.images), generation_options(args)
    rows, skipped, sheet = [], 0, ContactSheet(f"captions by {args.model}", args.sheet_limit)
    for start in tqdm(range(0, len(paths), args.batch_size), desc="caption", disable=args.out is None):
        batch_paths, images = [], []
        for path in paths[start:start + args.batch_size]:
            try:
                images.append(load_image(path, cfg.data))
                batch_paths.append(path)
            except (ValueError, OSError) as err:
                skipped += 1
                print(f"warning: skipping {path}: {err}", file=sys.stderr)
        if not images:
            continue
        captions = generate_captions(model, torch.stack(images), {**options, "tokenizer": tokenizer},
                                     args.batch_size)
        for path, caption in zip(batch_paths, captions):
            rows.append({"image": str(path), "caption": caption})
            if args.out:
                with Image.open(path) as image:
                    sheet.add(str(path), image, caption)
    return rows, sheet, skipped


def caption_shards(args, model, cfg, tokenizer):
    from vlp.caption.evaluate import generate_captions, references_of
    from vlp.caption.sheet import ContactSheet
    from vlp.data import eval_loader

    cfg.data.eval_batch_size = args.batch_size
    loader = eval_loader(cfg.data, None, spec=args.shards, rank=0, world_size=1)
    options = {**generation_options(args), "tokenizer": tokenizer}
    rows, skipped, sheet = [], 0, ContactSheet(f"captions by {args.model}", args.sheet_limit)
    for batch in tqdm(loader, desc="caption", unit="batch", disable=args.out is None):
        skipped += sum(batch["skipped"].values())
        captions = generate_captions(model, batch["image"], options, args.batch_size)
        for i, (key, caption, refs) in enumerate(zip(batch["key"], captions, references_of(batch))):
            rows.append({"key": key, "caption": caption, "references": refs})
            if args.out:
                sheet.add(key, Image.fromarray(batch["image"][i].permute(1, 2, 0).numpy()), caption, refs)
    return rows, sheet, skipped


def write_rows(out: str | None, rows: list[dict], sheet) -> None:
    from vlp.atomic import atomic_write_text

    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if not out:
        sys.stdout.write(text)
        return
    atomic_write_text(out, text)
    sheet.write(Path(out).with_suffix(".html"))


def score(rows: list[dict], meteor: bool, method: str) -> dict:
    from vlp.caption.metrics import caption_metrics

    ids = [str(i) for i in range(len(rows))]
    metrics = caption_metrics(dict(zip(ids, (r["caption"] for r in rows))),
                              dict(zip(ids, (r["references"] for r in rows))), meteor=meteor)
    return {"method": method, **metrics}


if __name__ == "__main__":
    sys.exit(main())

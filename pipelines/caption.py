"""Caption images with an exported vlp model directory (its captioning decoder).

    python pipelines/caption.py --model runs/demo/model --images photo.jpg some/folder \
        [--method beam|greedy|nucleus] [--num-beams 3] [--top-p 0.9] [--max-new-tokens 20] \
        [--out captions.jsonl]

Prints one JSON line per image ({"image": path, "caption": text}), or writes them to --out
(atomically). Unreadable images are skipped with a warning and counted on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
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
    p.add_argument("--images", required=True, nargs="+", help="image files and/or folders")
    p.add_argument("--method", choices=("beam", "greedy", "nucleus"), default="beam")
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: model.decoder.max_new_tokens")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="nucleus sampling seed")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="JSONL output file (default: stdout)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from vlp.data import load_image
    from vlp.model import load_model_dir

    try:
        paths = image_paths(args.images)
        model, cfg, tokenizer = load_model_dir(args.model)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if model.decoder is None:
        print(f"error: {args.model} has no captioning decoder (model.decoder.enabled: false)", file=sys.stderr)
        return 2
    options = {"method": args.method, "max_new_tokens": args.max_new_tokens}
    if args.method == "beam":
        options["num_beams"] = args.num_beams
    if args.method == "nucleus":
        options.update(top_p=args.top_p, temperature=args.temperature,
                       generator=torch.Generator().manual_seed(args.seed))
    lines, skipped = [], 0
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
        with torch.no_grad():
            captions = model.generate(torch.stack(images), tokenizer=tokenizer, **options)
        lines += [json.dumps({"image": str(p), "caption": c}) for p, c in zip(batch_paths, captions)]
    text = "".join(line + "\n" for line in lines)
    if args.out:
        tmp = f"{args.out}.tmp-{os.getpid()}"
        Path(tmp).write_text(text)
        os.replace(tmp, args.out)
    else:
        sys.stdout.write(text)
    print(f"captioned {len(lines)} images, skipped {skipped}", file=sys.stderr)
    return 0 if lines else 1


if __name__ == "__main__":
    sys.exit(main())

"""Embeddings of an open_clip checkpoint for tools/bench_recipe.py, which scores them with vlp's
own metric code. Runs under the python of an open_clip virtualenv (open-clip-torch installed;
vlp need not be), so it uses only open_clip, torch, numpy and PIL.

    OPENCLIP_PYTHON tools/openclip_embed.py --model-dir MODELS --model NAME \
        --checkpoint LOGS/NAME/checkpoints/epoch_1.pt --manifest manifest.json --out DIR

manifest.json: {"image_sets": {SET: {"shards": [tar, ...], "keys": [key, ...]} or {"files": [path, ...]}},
                "text_sets": {SET: [text, ...]}}
Writes DIR/SET.npy for every set: L2-normalized float32 rows, in the manifest's order. An
image is found by its sample key in the set's shards and decoded as open_clip's webdataset
trainer decodes it (PIL, converted to RGB), then open_clip's own eval preprocessing.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
BATCH = 256


def sample_key(member_name: str) -> tuple[str, str]:
    """webdataset's split of a member name: key = path up to the basename's first dot."""
    directory, _, base = member_name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def read_images(shards: list[str], keys: list[str]) -> list[Image.Image]:
    wanted = set(keys)
    found: dict[str, Image.Image] = {}
    for url in shards:
        with tarfile.open(url) as tar:
            for member in tar:
                key, ext = sample_key(member.name)
                if not member.isfile() or key not in wanted or ext not in IMAGE_EXTENSIONS:
                    continue
                if key in found:
                    raise SystemExit(f"error: sample key {key!r} has two images (second in {url})")
                data = tar.extractfile(member).read()
                found[key] = Image.open(io.BytesIO(data)).convert("RGB")
    missing = [k for k in keys if k not in found]
    if missing:
        raise SystemExit(f"error: {len(missing)} images not found in {shards[:3]}...: {missing[:5]}")
    return [found[k] for k in keys]


@torch.no_grad()
def embed_images(model, preprocess, images: list[Image.Image]) -> np.ndarray:
    out = []
    for start in range(0, len(images), BATCH):
        batch = torch.stack([preprocess(img) for img in images[start:start + BATCH]])
        out.append(model.encode_image(batch, normalize=True).float())
    return torch.cat(out).numpy()


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str]) -> np.ndarray:
    out = [model.encode_text(tokenizer(texts[start:start + BATCH]), normalize=True).float()
           for start in range(0, len(texts), BATCH)]
    return torch.cat(out).numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="folder of open_clip model configs (NAME.json)")
    parser.add_argument("--model", required=True, help="model config name")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint open_clip's trainer saved")
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    open_clip.add_model_config(args.model_dir)
    model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=args.checkpoint)
    model.eval()
    tokenizer = open_clip.get_tokenizer(args.model)
    manifest = json.loads(args.manifest.read_text())
    args.out.mkdir(parents=True, exist_ok=True)
    for name, spec in manifest["image_sets"].items():
        images = ([Image.open(path).convert("RGB") for path in spec["files"]] if "files" in spec
                  else read_images(spec["shards"], spec["keys"]))
        np.save(args.out / f"{name}.npy", embed_images(model, preprocess, images))
    for name, texts in manifest["text_sets"].items():
        np.save(args.out / f"{name}.npy", embed_texts(model, tokenizer, texts))
    return 0


if __name__ == "__main__":
    sys.exit(main())

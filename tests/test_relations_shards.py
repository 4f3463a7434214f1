"""tools/make_relations_shards.py: demo emoji → two-object scenes, val pairs never seen
together, foils that keep the words and change the meaning, shards the loaders read."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from shard_sets import load_tool, read_split
from vlp.config import DataConfig, load_config
from vlp.data import build_tokenizer, train_loader

ROOT = Path(__file__).resolve().parents[1]
relations = load_tool("make_relations_shards")
from devsets import with_article  # noqa: E402  (loading the tool put tools/ on the path)

TINY = ["--train", "80", "--val-groups", "8", "--unseen-fraction", "0.25", "--train-shards", "2", "--val-shards", "1"]
RELATION_WORDS = {"left", "right", "above", "below", "top", "bottom"}


def build(out: Path, *extra: str) -> Path:
    assert relations.main([str(out), *TINY, *extra]) == 0
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("relations") / "set")


def foil_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "foils.jsonl").read_text().splitlines()]


def test_val_pairs_never_meet_in_training_and_the_slice_is_never_seen(built):
    train, val = read_split(built, "train"), read_split(built, "val")
    assert len(train) == 80 and all(len(r["captions"]) == 3 for r in {**train, **val}.values())
    together = {frozenset(r["meta"]["emoji"]) for r in train.values()}
    in_training = {k for r in train.values() for k in r["meta"]["emoji"]}
    demo_val = {e.key for e in relations.read_emoji(ROOT / "shards" / "demo", "val")}
    novelty = Counter(r["meta"]["novelty"] for r in val.values())
    assert novelty["unseen emoji"] and novelty["unseen pair"]
    for row in val.values():
        pair = set(row["meta"]["emoji"])
        assert frozenset(pair) not in together
        if row["meta"]["novelty"] == "unseen pair":
            assert pair <= in_training
        else:
            assert pair <= demo_val and not pair & in_training


def test_each_val_scene_has_siblings_with_the_same_words(built):
    groups: dict[int, list[str]] = {}
    for row in read_split(built, "val").values():
        groups.setdefault(row["meta"]["group"], []).append(row["captions"][0])
    assert len(groups) == 8
    for captions in groups.values():
        assert len(captions) in (2, 4) and len(set(captions)) == len(captions)
        assert len({tuple(sorted(c.split())) for c in captions}) == 1  # a bag of words cannot tell them apart


def test_foils_keep_the_words_change_the_meaning_and_picture_the_foil(built):
    val = read_split(built, "val")
    lines = foil_lines(built)
    kinds = Counter(line["type"].split(" (")[0] for line in lines)
    assert set(kinds) == {"relation-swap", "object-swap", "attribute-swap"}
    assert any(line["type"].endswith("(unseen emoji)") for line in lines)
    for line in lines:
        (foil,), (foil_image,) = line["foils"], line["foil_images"]
        true, pictured = val[Path(line["image"]).stem], val[Path(foil_image).stem]
        assert (built / line["image"]).is_file() and (built / foil_image).is_file()
        assert line["caption"] in true["captions"] and foil != line["caption"]
        changed = Counter(line["caption"].split()) - Counter(foil.split())
        kind = line["type"].split(" (")[0]
        objects, colours = true["meta"]["objects"], true["meta"]["colours"]
        if kind == "relation-swap":  # the same words but the relation's; the objects' places swapped
            assert set(changed) <= RELATION_WORDS
            assert pictured["meta"]["objects"] == objects[::-1]
            assert pictured["meta"]["colours"] == (colours and colours[::-1])
        else:  # the same multiset of words, and exactly the foil image's caption
            assert not changed and foil in pictured["captions"]
            swapped = {"object-swap": (objects[::-1], colours), "attribute-swap": (objects, colours and colours[::-1])}
            assert (pictured["meta"]["objects"], pictured["meta"]["colours"]) == swapped[kind]


def test_captions_fit_the_demo_config_without_truncation(built):
    cfg = load_config(ROOT / "configs" / "demo.yaml", [])
    tokenizer = build_tokenizer(cfg.model.text)
    captions = [c for split in ("train", "val") for r in read_split(built, split).values() for c in r["captions"]]
    longest = max(len(tokenizer(c)["input_ids"]) for c in captions)
    assert longest <= cfg.data.max_len


def test_train_loader_reads_the_scenes(built):
    cfg = DataConfig(train=str(built / "train-{000000..000001}.tar"), batch_size=8, workers=0,
                     shuffle_buffer=8, image_size=64)
    batch = next(iter(train_loader(cfg, None)))
    assert batch["image"].shape == (8, 3, 64, 64) and batch["skipped"] == {}


def test_same_seed_same_bytes(built, tmp_path):
    again = build(tmp_path / "again")
    for name in ["foils.jsonl", "sizes.json", *(p.name for p in built.glob("*.tar"))]:
        assert (built / name).read_bytes() == (again / name).read_bytes(), name
    other = build(tmp_path / "other", "--seed", "1")
    assert (built / "foils.jsonl").read_bytes() != (other / "foils.jsonl").read_bytes()


def test_a_small_vocabulary_holds_its_val_pairs_out_of_training(tmp_path):
    # With 6 objects 80 scenes would meet every pair: the val pairs must be held out.
    out = build(tmp_path / "small", "--objects", "6")
    train, val = read_split(out, "train"), read_split(out, "val")
    in_training = {k for r in train.values() for k in r["meta"]["emoji"]}
    together = {frozenset(r["meta"]["emoji"]) for r in train.values()}
    assert len(in_training) == 6 and len(together) == 15 - 6  # 6 of the 15 pairs held out
    seen_pairs = {frozenset(r["meta"]["emoji"]) for r in val.values() if r["meta"]["novelty"] == "unseen pair"}
    assert len(seen_pairs) == 6 and all(p <= in_training and p not in together for p in seen_pairs)
    with pytest.raises(SystemExit, match="too few to hold"):
        build(tmp_path / "tiny", "--objects", "4")


def test_missing_demo_shards_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no train-.*tar in"):
        relations.main([str(tmp_path / "out"), "--demo", str(tmp_path)])
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_kept_unless_overwrite(built):
    with pytest.raises(SystemExit, match="pass --overwrite"):
        relations.main([str(built), *TINY])
    assert (built / "foils.jsonl").is_file()


@pytest.mark.parametrize("name, usable", [
    ("dog", True), ("bus", True), ("hot dog", True), ("chopsticks", False), ("flag: Japan", False),
    ("blue heart", False), ("grinning face with big eyes", False)])
def test_object_names_are_short_singular_and_untinted(name, usable):
    assert relations.nameable(name, max_words=2) == usable


@pytest.mark.parametrize("phrase, expected", [
    ("dog", "a dog"), ("apple", "an apple"), ("orange dog", "an orange dog"), ("umbrella", "an umbrella"),
    ("unicorn", "a unicorn"), ("UFO", "a UFO"), ("one-piece swimsuit", "a one-piece swimsuit"),
    ("x-ray", "an x-ray"), ("SOS button", "an SOS button"), ("T-Rex", "a T-Rex"), ("8", "an 8"),
    ("euro banknote", "a euro banknote"), ("italic font", "an italic font")])
def test_with_article_follows_a_generic_english_rule(phrase, expected):
    assert with_article(phrase) == expected

"""tools/make_font_shards.py: fonts → look-alike groups → splits on disjoint fonts → shards
the loaders and the zero-shot pipeline read. Renders with the fonts matplotlib ships."""
from __future__ import annotations

import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from shard_sets import load_tool, read_split, split_spec
from vlp.config import DataConfig
from vlp.data import train_loader
from vlp.zeroshot.classes import load_classes
from vlp.zeroshot.sources import open_source

fonts_tool = load_tool("make_font_shards")

MPL_FONTS = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
CHARS = "abg7&"
TINY = ["--fonts", str(MPL_FONTS), "--chars", CHARS, "--train", "30", "--val", "10",
        "--zeroshot", "10", "--min-groups", "3", "--train-shards", "2", "--eval-shards", "1"]


def jpegs(out: Path) -> dict[str, bytes]:
    images = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            images.update({m.name: tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")})
    return images


def build(out: Path, *extra: str) -> Path:
    assert fonts_tool.main([str(out), *TINY, *extra]) == 0
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("fonts") / "set")


def test_splits_hold_disjoint_fonts_and_balanced_classes(built):
    splits = {s: read_split(built, s) for s in ("train", "val", "zeroshot")}
    assert {s: len(rows) for s, rows in splits.items()} == {"train": 30, "val": 10, "zeroshot": 10}
    families = {s: {r["meta"]["family"] for r in rows.values()} for s, rows in splits.items()}
    files = {s: {r["meta"]["font_file"] for r in rows.values()} for s, rows in splits.items()}
    for a, b in (("train", "val"), ("train", "zeroshot"), ("val", "zeroshot")):
        assert not families[a] & families[b] and not files[a] & files[b]
    listed = json.loads((built / "fonts.json").read_text())["splits"]
    assert {Path(f["path"]).name for f in listed["val"]} >= files["val"]
    assert not {f["family"] for f in listed["train"]} & {f["family"] for f in listed["val"]}
    labels = (built / "classes.txt").read_text().split("\n")[:-1]
    assert labels == [fonts_tool.class_names(c)[0] for c in CHARS]
    assert Counter(r["meta"]["class"] for r in splits["train"].values()) == {label: 6 for label in labels}


def test_captions_name_the_class_and_the_rendered_style(built):
    for row in read_split(built, "val").values():
        meta, (first, listed, bare) = row["meta"], row["captions"]
        names = fonts_tool.class_names(meta["char"])
        assert any(f"{meta['size']} {meta['colour']} {n} in " in first for n in names)
        words = ([meta["weight"]] if meta["weight"] != "regular" else []) + (["italic"] if meta["italic"] else [])
        words += [meta["kind"]] if meta["kind"] else []
        assert first.endswith(f"{' '.join(words) or 'regular'} font")
        assert listed.split(", ")[1:] == words + [meta["colour"], meta["size"]]
        assert bare in {f"the {n}" for n in names}


def test_class_captions_are_the_same_three_phrasings_for_every_image_of_a_class(built, tmp_path):
    described, built = built, build(tmp_path / "class", "--captions", "class")
    assert jpegs(built) == jpegs(described)  # the same images: only the captions differ
    by_class = {}
    for row in read_split(built, "train").values():
        by_class.setdefault(row["meta"]["class"], set()).add(tuple(row["captions"]))
    assert len(by_class) == len(CHARS) and all(len(texts) == 1 for texts in by_class.values())
    first, second, third = by_class[fonts_tool.class_names("7")[0]].pop()
    assert (first, second, third) == ("a digit 7", "the number 7", "a picture of the numeral 7")
    assert "class alone" in (built / "README.md").read_text()


def test_zeroshot_split_reads_with_its_label_field_and_class_file(built):
    classes = load_classes(built / "classes.txt")
    source = open_source([split_spec(built, "zeroshot")], label_field="class")
    labels = [label for _, label, image in source]
    assert len(labels) == 10 and set(labels) <= set(classes.labels) and not source.skipped


def test_train_loader_gives_64_px_batches(built):
    cfg = DataConfig(train=split_spec(built, "train"), batch_size=8, workers=0, shuffle_buffer=8, image_size=64)
    batch = next(iter(train_loader(cfg, None)))
    assert batch["image"].shape == (8, 3, 64, 64) and batch["skipped"] == {}
    assert all(t.split()[0] in ("a", "an", "the") for t in batch["text"])


def test_same_seed_same_bytes_other_seed_other_set(built, tmp_path):
    again = build(tmp_path / "again")
    shards = sorted(p.name for p in built.glob("*.tar"))
    assert shards == sorted(p.name for p in again.glob("*.tar"))
    assert all((built / s).read_bytes() == (again / s).read_bytes() for s in shards)
    other = build(tmp_path / "other", "--seed", "1")
    assert any((built / s).read_bytes() != (other / s).read_bytes() for s in shards)


def test_fonts_that_cannot_draw_the_classes_are_left_out_with_a_reason():
    inspect = fonts_tool.inspect_font
    assert inspect(str(MPL_FONTS / "cmsy10.ttf"), 0, CHARS).startswith("symbol font")  # math symbols at ASCII
    assert inspect(str(MPL_FONTS / "LastResortHE-Regular.ttf"), 0, CHARS) == "draws two classes with one glyph"
    assert inspect(str(MPL_FONTS / "STIXNonUni.ttf"), 0, CHARS) == "lacks a class character"
    assert inspect(str(MPL_FONTS / "DejaVuSans-Bold.ttf"), 0, CHARS).style_words() == ["bold", "sans-serif"]
    assert inspect(str(MPL_FONTS / "DejaVuSerif-Italic.ttf"), 0, CHARS).style_words() == ["italic", "serif"]
    assert inspect(str(MPL_FONTS / "DejaVuSansMono.ttf"), 0, CHARS).style_words() == ["monospaced"]


def test_too_few_fonts_is_a_clear_error(tmp_path):
    only = tmp_path / "only"
    only.mkdir()
    for path in MPL_FONTS.glob("DejaVuSans-*.ttf"):
        shutil.copy(path, only)
    with pytest.raises(SystemExit, match="too few fonts: 3 usable fonts in 1 groups"):
        fonts_tool.main([str(tmp_path / "out"), "--fonts", str(only), "--chars", CHARS])
    assert not (tmp_path / "out").exists()


def test_look_alike_groups_join_families_name_extensions_and_close_renders():
    font = fonts_tool.Font
    fonts = [font("a", 0, "Noto Serif", "regular", False, None),
             font("b", 0, "Noto Serif Display", "bold", False, None),
             font("c", 0, "Clone", "regular", False, None),
             font("d", 0, "Far Away", "regular", False, None),
             font("e", 0, "Noto Serif", "bold", True, None)]
    dist = np.full((5, 5), 0.5)
    dist[2, 4] = dist[4, 2] = fonts_tool.LOOK_ALIKE / 2
    np.fill_diagonal(dist, 0)
    assert fonts_tool.look_alike_groups(fonts, dist) == [[0, 1, 2, 4], [3]]


def test_help_prints_the_default_classes(capsys):
    """The default classes hold a '%', which argparse's help formatting once choked on."""
    tool = load_tool("make_font_shards")
    with pytest.raises(SystemExit) as stop:
        tool.parse_args(["--help"])
    assert stop.value.code == 0
    assert tool.DEFAULT_CHARS in capsys.readouterr().out.replace("\n", "").replace(" ", "")

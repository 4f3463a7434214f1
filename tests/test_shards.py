"""tools/make_shards.py: folder of images → shards → the loader, and the skip report."""
from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from shard_sets import load_tool, read_split
from vlp.data.writer import ShardWriter

make_shards = load_tool("make_shards")


def image(path: Path, color=(0, 120, 240), fmt=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (30, 20), color).save(path, fmt)


def test_round_trip_from_captions_jsonl(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    lines = []
    for i in range(23):
        image(src / "photos" / f"p{i}.jpg", (i * 10, 50, 50))
        caption = f"photo {i}" if i % 2 else [f"photo {i}", f"second caption {i}"]
        lines.append(json.dumps({"image": f"photos/p{i}.jpg", "caption": caption, "source": "cam"}))
    (src / "captions.jsonl").write_text("\n".join(lines) + "\n")
    assert make_shards.main([str(src), str(out), "--maxcount", "5", "--val-fraction", "0.2", "--seed", "3"]) == 0

    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"train-000000.tar": 5, "train-000001.tar": 5, "train-000002.tar": 5,
                     "train-000003.tar": 3, "val-000000.tar": 5}
    rows = {**read_split(out, "train"), **read_split(out, "val")}
    assert len(rows) == 23
    by_image = {r["meta"]["image"]: r for r in rows.values()}
    assert by_image["photos/p3.jpg"]["captions"] == ["photo 3"]
    assert by_image["photos/p4.jpg"]["captions"] == ["photo 4", "second caption 4"]
    assert all(r["meta"]["source"] == "cam" for r in rows.values())
    # Same seed → same split; another seed → another split.
    val_images = {r["meta"]["image"] for r in read_split(out, "val").values()}
    make_shards.main([str(src), str(tmp_path / "again"), "--maxcount", "5", "--val-fraction", "0.2", "--seed", "3"])
    assert {r["meta"]["image"] for r in read_split(tmp_path / "again", "val").values()} == val_images
    make_shards.main([str(src), str(tmp_path / "other"), "--maxcount", "5", "--val-fraction", "0.2", "--seed", "4"])
    assert {r["meta"]["image"] for r in read_split(tmp_path / "other", "val").values()} != val_images


def test_csv_and_sidecar_captions(tmp_path):
    csv_src = tmp_path / "csv"
    for i in range(3):
        image(csv_src / f"{i}.png", fmt="PNG")
    (csv_src / "captions.csv").write_text(
        'image,caption,license\n0.png,"a, quoted caption",cc0\n0.png,another,cc0\n1.png,one,cc-by\n2.png,two,cc0\n')
    make_shards.main([str(csv_src), str(tmp_path / "o1"), "--val-fraction", "0"])
    rows = {r["meta"]["image"]: r for r in read_split(tmp_path / "o1", "train").values()}
    assert rows["0.png"]["captions"] == ["a, quoted caption", "another"]
    assert rows["1.png"]["meta"]["license"] == "cc-by"

    side = tmp_path / "side"
    image(side / "cat.jpg")
    (side / "cat.txt").write_text("a cat\n")
    make_shards.main([str(side), str(tmp_path / "o2"), "--val-fraction", "0"])
    assert [r["captions"] for r in read_split(tmp_path / "o2", "train").values()] == [["a cat"]]


def test_skips_are_reported_with_reasons(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    image(src / "ok.jpg")
    image(src / "blank.jpg")
    image(src / "nocap.jpg")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    good_jpeg = (src / "ok.jpg").read_bytes()
    (src / "cut.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    rows = [{"image": "ok.jpg", "caption": "fine"}, {"image": "blank.jpg", "caption": "  "},
            {"image": "broken.jpg", "caption": "x"}, {"image": "cut.jpg", "caption": "x"},
            {"image": "gone.jpg", "caption": "x"}]
    (src / "captions.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n{oops\n")
    assert make_shards.main([str(src), str(out), "--val-fraction", "0"]) == 0
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    reasons = Counter(s["reason"] for s in skipped)
    assert reasons == {"bad_image": 2, "empty_caption": 1, "missing_caption": 1,
                       "missing_image": 1, "bad_caption_line": 1}
    assert "skipped 6" in capsys.readouterr().err
    assert json.loads((out / "sizes.json").read_text()) == {"train-000000.tar": 1}


def test_existing_shards_need_overwrite(tmp_path):
    src = tmp_path / "src"
    image(src / "a.jpg")
    (src / "a.txt").write_text("a")
    make_shards.main([str(src), str(tmp_path / "out"), "--val-fraction", "0"])
    with pytest.raises(SystemExit):
        make_shards.main([str(src), str(tmp_path / "out"), "--val-fraction", "0"])
    assert make_shards.main([str(src), str(tmp_path / "out"), "--val-fraction", "0", "--overwrite"]) == 0


def test_writer_leaves_no_whole_looking_shard_when_killed(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "train", maxcount=2) as writer:
            for i in range(3):
                writer.write({"__key__": f"k{i}", "txt": "x"})
            raise RuntimeError("killed")
    # The completed first shard is in place; the interrupted second one is not.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        assert tar.getnames() == ["k0.txt", "k1.txt"]

"""Zero-shot inputs and report without a model: templates, class files, sources, metrics."""
import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from vlp.zeroshot import report
from vlp.zeroshot.classes import ClassList, load_classes
from vlp.zeroshot.errors import ZeroShotError
from vlp.zeroshot.sources import open_source
from vlp.zeroshot.templates import IMAGENET80, LearnedPrompt, load_templates


def _png(color=(255, 0, 0), size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- templates

def test_builtin_template_sets():
    assert load_templates("simple") == ["a photo of a {}."]
    assert load_templates("none") == ["{}"]
    assert len(IMAGENET80) == 80 and len(set(IMAGENET80)) == 80
    assert all(t.count("{}") == 1 for t in IMAGENET80)


def test_template_file_and_errors(tmp_path):
    good = tmp_path / "t.txt"
    good.write_text("# comment\na {} here\n\nthe {}\n")
    assert load_templates(str(good)) == ["a {} here", "the {}"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo\n")
    with pytest.raises(ZeroShotError, match=r"bad.txt:1: .*exactly one"):
        load_templates(str(bad))
    with pytest.raises(ZeroShotError, match="neither a built-in"):
        load_templates("imagenet81")
    with pytest.raises(ZeroShotError, match="learned prompt file not found"):
        load_templates(f"learned:{tmp_path}/nope.safetensors")
    (tmp_path / "ctx.safetensors").write_bytes(b"x")
    assert isinstance(load_templates(f"learned:{tmp_path}/ctx.safetensors"), LearnedPrompt)


# --------------------------------------------------------------------------- classes

def test_class_txt_and_json(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("red\n blue \n\n")
    assert load_classes(txt) == ClassList(["red", "blue"], ["red", "blue"])
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"n01": "goldfish", "n02": "shark"}))
    c = load_classes(js)
    assert c.labels == ["n01", "n02"] and c.names == ["goldfish", "shark"]


def test_class_file_errors(tmp_path, caplog):
    dup = tmp_path / "dup.txt"
    dup.write_text("red\nblue\nred\n")
    with pytest.raises(ZeroShotError, match=r"duplicate class names: \['red'\]"):
        load_classes(dup)
    blank = tmp_path / "blank.txt"
    blank.write_text("red\n\nblue\n\n")
    with caplog.at_level(logging.WARNING):
        assert load_classes(blank).labels == ["red", "blue"]
    assert "skipped 1 empty line(s): [2]" in caplog.text
    dup_key = tmp_path / "k.json"
    dup_key.write_text('{"a": "x", "a": "y"}')
    with pytest.raises(ZeroShotError, match=r"duplicate labels \['a'\]"):
        load_classes(dup_key)
    dup_name = tmp_path / "n.json"
    dup_name.write_text('{"a": "x", "b": "x"}')
    with pytest.raises(ZeroShotError, match="duplicate display names"):
        load_classes(dup_name)
    with pytest.raises(ZeroShotError, match="class file not found"):
        load_classes(tmp_path / "missing.txt")
    one = tmp_path / "one.txt"
    one.write_text("red\n")
    with pytest.raises(ZeroShotError, match="at least 2 classes"):
        load_classes(one)


# --------------------------------------------------------------------------- sources

def test_imagefolder_counts_unreadable(tmp_path):
    for label, color in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (tmp_path / label).mkdir()
        for i in range(2):
            (tmp_path / label / f"{i}.png").write_bytes(_png(color))
    (tmp_path / "red" / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "red" / "notes.txt").write_text("ignored: not an image extension")
    source = open_source([str(tmp_path)])
    items = list(source)
    assert source.kind == "imagefolder" and source.labelled
    assert sorted(label for _, label, _ in items) == ["blue", "blue", "red", "red"]
    assert source.skipped == {"unreadable image": 1}


def test_plain_folder_file_list_and_single(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(_png())
    folder = open_source([str(tmp_path)])
    assert folder.kind == "folder" and not folder.labelled and len(list(folder)) == 3
    listing = tmp_path / "list.txt"
    listing.write_text("0.png\n1.png\n")
    assert [k.endswith(".png") for k, _, _ in open_source([str(listing)])] == [True, True]
    files = open_source([str(tmp_path / "0.png"), str(tmp_path / "2.png")])
    assert files.expected_count() == 2 and files.kind == "files"
    single = open_source([str(tmp_path / "1.png")])
    assert single.kind == "single"
    with pytest.raises(ZeroShotError, match="image file not found"):
        open_source([str(tmp_path / "0.png"), str(tmp_path / "zzz.png")])
    with pytest.raises(ZeroShotError, match="images not found"):
        open_source([str(tmp_path / "nothing_here")])


def _write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_shards_with_label_field(tmp_path):
    _write_shard(tmp_path / "val-000000.tar", [
        ("a", {"png": _png(), "json": json.dumps({"group": "red"}).encode()}),
        ("b", {"png": b"garbage", "json": json.dumps({"group": "red"}).encode()}),
        ("c", {"png": _png(), "json": json.dumps({"other": 1}).encode()}),
        ("d", {"json": json.dumps({"group": "blue"}).encode()}),
    ])
    _write_shard(tmp_path / "val-000001.tar", [
        ("e", {"png": _png((0, 0, 255)), "json": json.dumps({"group": "blue"}).encode()})])
    source = open_source([f"{tmp_path}/val-*.tar"], label_field="group")
    got = [(k, label) for k, label, _ in source]
    assert got == [("a", "red"), ("e", "blue")]
    assert source.skipped == {"unreadable image": 1, "no 'group' in json": 1, "no image member": 1}
    expanded_by_shell = open_source([str(tmp_path / "val-000000.tar"), str(tmp_path / "val-000001.tar")],
                                    label_field="group")
    assert [k for k, _, _ in expanded_by_shell] == ["a", "e"]
    unlabelled = open_source([f"{tmp_path}/val-{{000000..000001}}.tar"])
    assert not unlabelled.labelled and len(list(unlabelled)) == 3
    with pytest.raises(ZeroShotError, match="shards not found"):
        open_source([f"{tmp_path}/train-*.tar"], label_field="group")
    with pytest.raises(ZeroShotError, match="--label-field applies to shards"):
        open_source([str(tmp_path)], label_field="group")


# --------------------------------------------------------------------------- metrics + report

def test_metrics_per_class_and_unknown_labels():
    classes = ClassList(["a", "b", "c"], ["a", "b", "c"])
    probs = torch.tensor([[.7, .2, .1], [.1, .8, .1], [.6, .3, .1], [.2, .3, .5], [.5, .4, .1]])
    labels = ["a", "b", "b", "c", "zebra"]
    m = report.classification_metrics(probs, labels, classes)
    assert m["n"] == 4 and m["n_predicted"] == 5
    assert m["unknown_labels"] == {"zebra": 1}
    assert m["top1"] == pytest.approx(3 / 4)
    assert m["per_class"]["b"] == {"n": 2, "accuracy": 0.5}
    assert m["mean_per_class"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["confusion"][1] == [1, 1, 0]
    assert json.loads(report.summary_line(m)) == {"top1": 0.75, "top5": 1.0,
                                                  "mean_per_class": m["mean_per_class"], "n": 4}


def test_report_files(tmp_path):
    classes = ClassList(["a", "b"], ["apple", "banana"])
    preds = report.Predictions()
    probs = torch.tensor([[.9, .1], [.8, .2], [.3, .7]])
    thumbs = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    preds.add(["k0", "k1", "k2"], ["a", "b", "b"], probs, thumbs, classes.index())
    assert [m[1] for m in preds.mistakes] == ["k1"]
    report.write_predictions_csv(tmp_path / "predictions.csv", preds, classes)
    rows = (tmp_path / "predictions.csv").read_text().splitlines()
    assert rows[0] == "key,label,correct,top1,p1,top2,p2"
    assert rows[2] == "k1,b,0,a,0.8000,b,0.2000"
    m = report.classification_metrics(preds.matrix(2), preds.labels, classes)
    report.plot_confusion(tmp_path / "confusion.png", m["confusion"], classes)
    assert report.plot_mistakes(tmp_path / "mistakes.png", preds, classes)
    for name in ("confusion.png", "mistakes.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*"))  # no temp files left behind

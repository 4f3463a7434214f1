"""Foil evaluation (vlp.foils, pipelines/foils.py): the file formats, the report's numbers
against direct model API calls, chance levels, skips and the command line."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from test_retrieval_support import COLORS, SHAPES, TINY, shape_image, tiny_model_dir
from vlp.config import ConfigError, load_config
from vlp.data import load_image, tokenize
from vlp.data.images import decode_image, eval_transform
from vlp.foils import FoilsError, evaluate_foils, read_foils, scorers_of, training_foils
from vlp.foils.run import _load
from vlp.model import build_model, load_model_dir, save_model_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "pipelines"))
import foils as foils_cli  # noqa: E402  (pipelines/foils.py)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """24 shape pictures: img/{color}_{shape}.jpg."""
    folder = tmp_path_factory.mktemp("foils") / "img"
    folder.mkdir()
    for i, (color, shape) in enumerate((c, s) for c in COLORS for s in SHAPES):
        (folder / f"{color}_{shape}.jpg").write_bytes(shape_image(color, shape, i))
    return folder


def caption_tests(n: int = 14) -> list[dict]:
    """Tests with 1 to 3 foils (chance 1/2 to 1/4) in two types."""
    tests = []
    for i in range(n):
        color, shape = COLORS[i % len(COLORS)], SHAPES[i % len(SHAPES)]
        other = COLORS[(i + 3) % len(COLORS)]
        foils = [f"a {other} {shape}", f"a {color} {SHAPES[(i + 1) % 3]}", f"{shape} a {color}"]
        tests.append({"image": f"img/{color}_{shape}.jpg", "caption": f"a {color} {shape}",
                      "foils": foils[:1 + i % 3], "type": "colour" if i % 2 else "shape"})
    return tests


# --------------------------------------------------------------------------- formats

def test_the_four_formats_read_alike(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"image": "a.jpg", "caption": "a dog left of a cat", "foils": ["a cat left of a dog"], "type": "rel"},
        "",  # blank lines are not records
        {"filename": "a.jpg", "caption": "a dog left of a cat", "negative_caption": "a cat left of a dog"},
        {"image_path": "a.jpg", "true_caption": "a dog left of a cat", "false_caption": "a cat left of a dog",
         "relation_name": "left of", "bbox_x": 1, "bbox_y": 2, "bbox_w": 10, "bbox_h": 20},
        {"image_0": "a", "image_1": "b", "caption_0": "a dog left of a cat",
         "caption_1": "a cat left of a dog", "collapsed_tag": "Object"},
        {"image": "a.jpg", "caption": "x y", "foils": ["y x", "x x"], "foil_images": ["b.jpg", "c.jpg"]},
    ])
    items = read_foils(path).items
    assert [i.captions for i in items[:4]] == [("a dog left of a cat", "a cat left of a dog")] * 4
    assert [i.images for i in items] == [("a.jpg",)] * 3 + [("a", "b"), ("a.jpg", "b.jpg", "c.jpg")]
    # A record without a type takes the file's stem, as SugarCrepe reports per file.
    assert [i.type for i in items] == ["rel", "mixed", "left of", "Object", "mixed"]
    assert items[2].box == (1, 2, 11, 22) and items[0].box is None
    assert [i.winoground for i in items] == [False, False, False, True, False]
    assert items[0].where == f"{path}:1" and items[2].where == f"{path}:4"


def test_json_files_hold_a_list_or_an_id_mapping(tmp_path):
    record = {"filename": "a.jpg", "caption": "a b", "negative_caption": "b a"}
    mapping = tmp_path / "swap_att.json"
    mapping.write_text(json.dumps({"7": record, "9": {**record, "caption": "c d"}}))
    items = read_foils(mapping).items
    assert [i.captions[0] for i in items] == ["a b", "c d"] and items[1].where == f"{mapping}['9']"
    listed = tmp_path / "vg_relation.json"
    listed.write_text(json.dumps([{"image_path": "a.jpg", "true_caption": "a b", "false_caption": "b a"}]))
    assert read_foils(listed).items[0].captions == ("a b", "b a")
    scalar = tmp_path / "bad.json"
    scalar.write_text("3")
    with pytest.raises(FoilsError, match="list or an"):
        read_foils(scalar)


GOOD = {"image": "a.jpg", "caption": "a b", "foils": ["b a"]}


@pytest.mark.parametrize("line, message", [
    ('{"image": "a.jpg", "caption": ', "not valid JSON"),
    ('["a.jpg", "a b", ["b a"]]', "a JSON object, not list"),
    (json.dumps({"image": "a.jpg", "caption": "a b"}), "'foils' must be a non-empty string or"),
    (json.dumps({**GOOD, "foils": []}), "'foils' must be"),
    (json.dumps({**GOOD, "foils": ["b a", 3]}), "'foils' must be"),
    (json.dumps({**GOOD, "caption": " "}), "'caption' must be a non-empty string"),
    (json.dumps({**GOOD, "type": 3}), "'type' must be a string"),
    (json.dumps({**GOOD, "foil_images": [""]}), "'foil_images' must be"),
    (json.dumps({"img": "a.jpg", "text": "a b"}), "no known field set.*got img, text"),
    (json.dumps({"image_path": "a.jpg", "true_caption": "a", "false_caption": "b",
                 "bbox_x": 0, "bbox_y": 0, "bbox_w": 0, "bbox_h": 5}), "bbox"),
])
def test_a_malformed_line_is_an_error_naming_the_line_and_the_fault(tmp_path, line, message):
    path = write_jsonl(tmp_path / "f.jsonl", [GOOD, line])
    with pytest.raises(FoilsError, match=message) as err:
        read_foils(path)
    assert f"{path}:2" in str(err.value)


def test_a_foil_equal_to_its_caption_is_a_counted_skip(tmp_path, caplog):
    path = write_jsonl(tmp_path / "f.jsonl", [GOOD, {**GOOD, "foils": ["x", "a b"]}])
    foil_set = read_foils(path)
    assert len(foil_set.items) == 1 and foil_set.skipped == {"foil_equals_caption": 1}
    assert f"{path}:2" in caplog.text
    with pytest.raises(FoilsError, match="holds no foil test"):
        read_foils(write_jsonl(tmp_path / "g.jsonl", [{**GOOD, "foils": ["a b"]}]))


def test_images_resolve_against_the_root_and_a_suffixless_name_finds_its_file(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "ex_0_img_0.png").write_bytes(b"")
    path = write_jsonl(tmp_path / "f.jsonl", [GOOD])
    assert read_foils(path).resolve("a.jpg") == tmp_path / "a.jpg"
    foil_set = read_foils(path, tmp_path / "root")
    assert foil_set.resolve("ex_0_img_0") == tmp_path / "root" / "ex_0_img_0.png"
    assert foil_set.resolve("/abs/a.jpg") == Path("/abs/a.jpg")
    with pytest.raises(FoilsError, match="not a folder"):
        read_foils(path, tmp_path / "nope")


def test_an_aro_box_crops_the_image_in_file_pixels(tmp_path):
    cfg = load_config(None, TINY)
    pixels = Image.new("RGB", (64, 32), "red")
    pixels.paste(Image.new("RGB", (32, 32), "blue"), (32, 0))
    pixels.save(tmp_path / "two.jpg", quality=95)
    cropped = _load(tmp_path / "two.jpg", (32, 0, 64, 32), cfg.data)
    full = Image.open(tmp_path / "two.jpg").convert("RGB")
    torch.testing.assert_close(cropped, eval_transform(cfg.data)(full.crop((32, 0, 64, 32))))
    torch.testing.assert_close(_load(tmp_path / "two.jpg", None, cfg.data),
                               eval_transform(cfg.data)(decode_image((tmp_path / "two.jpg").read_bytes(), 32)))
    assert cropped[2].mean() > cropped[0].mean()  # the blue half


# --------------------------------------------------------------------------- scores

def direct_matrices(model, tokenizer, cfg, paths: list[Path], captions: list[str]) -> dict:
    """One test scored by the model API directly, pair by pair (no batching, no trimming)."""
    imgs = torch.stack([load_image(p, cfg.data) for p in paths])
    tok = tokenize(tokenizer, captions, cfg.data.max_len)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    with torch.no_grad():
        itc = model.encode_image(imgs) @ model.encode_text(ids, mask).T
        out = {"itc": (itc, itc)}
        if model.has_filip:
            out["filip"] = model.filip_scores(model.encode_image_tokens(imgs),
                                              model.encode_text_tokens(ids, mask), mask)
        if model.has_itm:
            n_img, n_cap = len(paths), len(captions)
            itm = model.itm_scores(ids.repeat(n_img, 1), mask.repeat(n_img, 1),
                                   images=imgs.repeat_interleave(n_cap, 0)).view(n_img, n_cap)
            out["itm"] = (itm, itm)
            combined = model.logit_scale * itc + itm.log()  # s·cos + log p_itm (vlp.metrics.rerank_score)
            out["rerank"] = (combined, combined)
    return out


def direct_report(model, tokenizer, cfg, foil_set) -> dict:
    """Accuracy per scorer and type, and image-side / Winoground verdicts, from direct calls."""
    verdicts = []
    for item in foil_set.items:
        m = direct_matrices(model, tokenizer, cfg, [foil_set.resolve(p) for p in item.images],
                            list(item.captions))
        verdicts.append((item, {s: (bool(c[0, 0] > c[0, 1:].max()), bool(i[0, 0] > i[1:, 0].max())
                                    if len(item.images) > 1 else None,
                                    bool(c[0, 0] > c[0, 1] and c[1, 1] > c[1, 0]) if item.winoground else None,
                                    bool(i[0, 0] > i[1, 0] and i[1, 1] > i[0, 1]) if item.winoground else None)
                                for s, (c, i) in m.items()}))
    return verdicts


def accuracy(verdicts, scorer, position, kind=None) -> float:
    rows = [v[scorer][position] for item, v in verdicts if kind in (None, item.type)
            and v[scorer][position] is not None]
    return sum(rows) / len(rows)


@pytest.fixture(scope="module")
def model():
    model, cfg, tokenizer = load_model_dir(tiny_model_dir())
    return model, cfg, tokenizer


def test_the_report_equals_direct_model_calls_per_scorer_and_type(model, images):
    model, cfg, tokenizer = model
    foil_set = read_foils(write_jsonl(images.parent / "captions.jsonl", caption_tests()))
    report = evaluate_foils(model, tokenizer, foil_set, cfg.data, batch_size=5)  # several batches
    verdicts = direct_report(model, tokenizer, cfg, foil_set)
    assert report["scorers"] == ["itc", "filip", "itm", "rerank"]
    accuracies = set()
    for scorer in report["scorers"]:
        assert report[scorer] == pytest.approx(accuracy(verdicts, scorer, 0)), scorer
        for kind in ("colour", "shape"):
            assert report["by_type"][kind][scorer] == pytest.approx(accuracy(verdicts, scorer, 0, kind))
        accuracies.add(report[scorer])
    assert len(accuracies) > 1 or 0 < report["itc"] < 1  # the comparison is not vacuous
    assert report["n"] == 14 and report["by_type"]["colour"]["n"] == 7
    # Chance: the mean over tests of 1 / (1 + foils); foils cycle 1, 2, 3.
    assert report["chance"] == pytest.approx(sum(1 / (2 + i % 3) for i in range(14)) / 14)
    assert report["by_type"]["shape"]["chance"] == pytest.approx(
        sum(1 / (2 + i % 3) for i in range(0, 14, 2)) / 7)
    assert "image" not in report and "winoground" not in report


def test_image_side_and_winoground_scores_equal_direct_model_calls(model, images):
    model, cfg, tokenizer = model
    tests = [{"image_0": f"img/{c}_circle", "image_1": f"img/{d}_square", "caption_0": f"a {c} circle",
              "caption_1": f"a {d} square", "type": "pair"} for c, d in zip(COLORS[:5], COLORS[1:])]
    tests += [{"image": f"img/{c}_triangle.jpg", "caption": f"a {c} triangle", "foils": ["a circle"],
               "foil_images": [f"img/{c}_circle.jpg", f"img/{d}_triangle.jpg"], "type": "three"}
              for c, d in zip(COLORS[:4], COLORS[2:])]
    foil_set = read_foils(write_jsonl(images.parent / "pairs.jsonl", tests))
    report = evaluate_foils(model, tokenizer, foil_set, cfg.data, batch_size=7)
    verdicts = direct_report(model, tokenizer, cfg, foil_set)
    for scorer in report["scorers"]:
        assert report[scorer] == pytest.approx(accuracy(verdicts, scorer, 0))
        assert report["image"][scorer] == pytest.approx(accuracy(verdicts, scorer, 1))
        wino = report["winoground"][scorer]
        assert wino["text"] == pytest.approx(accuracy(verdicts, scorer, 2))
        assert wino["image"] == pytest.approx(accuracy(verdicts, scorer, 3))
        both = [v[scorer][2] and v[scorer][3] for item, v in verdicts if item.winoground]
        assert wino["group"] == pytest.approx(sum(both) / len(both))
    assert report["image"]["n"] == 9
    assert report["image"]["chance"] == pytest.approx((5 * 1 / 2 + 4 * 1 / 3) / 9)
    assert report["by_type"]["three"]["image"]["chance"] == pytest.approx(1 / 3)
    assert report["winoground"]["n"] == 5 and "winoground" not in report["by_type"]["three"]


def test_scorers_the_model_lacks_are_left_out(tmp_path, images, capsys):
    cfg = load_config(None, TINY + ["model.text.fusion_layers=0", "loss.itm=0", "loss.filip=0"])
    model = build_model(cfg)
    assert scorers_of(model) == ("itc",)
    save_model_dir(model.eval(), cfg, model.tokenizer, tmp_path / "itc_only")
    foils = write_jsonl(images.parent / "few.jsonl", caption_tests(4))
    code, out, _ = _cli(capsys, "--model", tmp_path / "itc_only", "--foils", foils, "--out", tmp_path / "out")
    summary = json.loads(out[-1])
    assert code == 0 and set(summary) == {"n", "chance", "itc", "by_type"}
    assert set(summary["by_type"]["shape"]) == {"n", "chance", "itc"}


# --------------------------------------------------------------------------- command line

def _cli(capsys, *args) -> tuple[int, list[str], str]:
    code = foils_cli.main([str(a) for a in args] + ["--quiet"])
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err


def test_cli_table_report_chart_and_a_missing_image_counted(tmp_path, images, capsys, caplog):
    tests = caption_tests(6) + [{**GOOD, "image": "img/gone.jpg"}]
    foils = write_jsonl(tmp_path / "set.jsonl", tests)
    code, out, err = _cli(capsys, "--model", tiny_model_dir(), "--foils", foils, "--images", images.parent,
                          "--out", tmp_path / "out")
    assert code == 0, err
    summary = json.loads(out[-1])
    report = json.loads((tmp_path / "out" / "foils.json").read_text())
    assert summary == {k: report[k] for k in ("n", "chance", "itc", "filip", "itm", "rerank")} | {
        "by_type": {t: {k: b[k] for k in ("n", "chance", "itc", "filip", "itm", "rerank")}
                    for t, b in report["by_type"].items()}}
    assert summary["n"] == 6 and report["skipped"] == {"missing_image": 1}
    assert "gone.jpg" in caplog.text and f"{foils}:7" in caplog.text
    assert any(line.startswith("all") for line in out) and "skipped: {'missing_image': 1}" in out
    assert Image.open(tmp_path / "out" / "foils.png").size[0] > 100


def test_cli_user_errors_are_one_line_messages(tmp_path, images, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, {"image": "a.jpg"}])
    code, _, err = _cli(capsys, "--model", tiny_model_dir(), "--foils", bad)
    assert code == 2 and f"{bad}:3" in err and "Traceback" not in err
    code, _, err = _cli(capsys, "--model", tmp_path / "nope", "--foils", write_jsonl(tmp_path / "ok.jsonl", [GOOD]))
    assert code == 2 and "model directory not found" in err
    code, _, err = _cli(capsys, "--model", tiny_model_dir(), "--foils", tmp_path / "ok.jsonl",
                        "--out", tmp_path / "out")
    assert code == 2 and "no test of" in err and "missing_image" in err


# --------------------------------------------------------------------------- training eval

def test_training_foils_check_the_file_and_the_val_set_at_start(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "{"])
    cfg = load_config(None, TINY + ["data.val=x.tar", f"eval.foils={bad}"])
    with pytest.raises(ConfigError, match=f"eval.foils.*{bad}:2"):
        training_foils(cfg)
    cfg = load_config(None, TINY + ["data.val=", f"eval.foils={write_jsonl(tmp_path / 'ok.jsonl', [GOOD])}"])
    with pytest.raises(ConfigError, match="needs data.val"):
        training_foils(cfg)
    assert training_foils(load_config(None, TINY)) is None

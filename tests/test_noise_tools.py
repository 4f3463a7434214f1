"""Planting caption noise (tools/make_noisy_shards.py) and scoring a filter against it
(tools/capfilt_noise_report.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from test_capfilt import capfilt, samples
from test_retrieval_support import tiny_shards

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import capfilt_noise_report  # noqa: E402
import make_noisy_shards  # noqa: E402


def plant(out: Path, seed: int = 0, capsys=None) -> list[dict]:
    assert make_noisy_shards.main(["--fraction", "0.4", "--seed", str(seed), "::".join(tiny_shards()), str(out)]) == 0
    return [json.loads(line) for line in (out / "planted.jsonl").read_text().splitlines()]


def captions_of(members: dict[str, bytes]) -> list[str]:
    return [members["txt"].decode(), *json.loads(members.get("json", b"{}")).get("captions", [])]


def test_noise_is_exact_deterministic_and_recorded(tmp_path):
    planted = plant(tmp_path / "a")
    assert len(planted) == round(0.4 * 61)  # 30 samples x 2 captions + the undecodable one's
    plant(tmp_path / "b")
    for name in ("part0-000000.tar", "part1-000000.tar", "part2-000000.tar", "planted.jsonl", "sizes.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert plant(tmp_path / "c", seed=1) != planted
    by_key = {}
    for shard in tiny_shards():
        by_key.update(samples(Path(shard)))
    noisy = {}
    for name in ("part0-000000.tar", "part1-000000.tar", "part2-000000.tar"):
        noisy.update(samples(tmp_path / "a" / name))
    assert list(noisy) == list(by_key)  # every sample (the image is not decoded here)
    for row in planted:
        members = noisy[row["key"]]
        captions = captions_of(members)
        originals, donor = captions_of(by_key[row["key"]]), captions_of(by_key[row["donor"]])
        assert captions[row["slot"]] == row["planted"] and originals[row["slot"]] == row["original"]
        assert row["donor"] != row["key"] and row["planted"] in donor and row["planted"] not in originals
        assert members["jpg"] == by_key[row["key"]]["jpg"]
        if "json" in by_key[row["key"]]:
            assert json.loads(members["json"])["n"] == json.loads(by_key[row["key"]]["json"])["n"]


def test_report_scores_the_filter_on_the_planted_captions(tmp_path, capsys):
    planted = plant(tmp_path / "noisy")
    shards = [str(tmp_path / "noisy" / f"part{i}-000000.tar") for i in range(3)]
    capfilt(synthetic=1, threshold=None, top_m=1).run(shards, tmp_path / "filtered", model_name="tiny")
    capsys.readouterr()
    assert capfilt_noise_report.main(["--planted", str(tmp_path / "noisy/planted.jsonl"),
                                      "--filtered", str(tmp_path / "filtered"), "--sweep", "0", "2"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # The undecodable sample is a counted skip in CapFilt: its captions get no verdict.
    in_broken = sum(p["key"] == "broken" for p in planted)
    assert report["original_captions"] == 60 and report["planted_found"] == len(planted) - in_broken
    # Count by hand from the shards: top-1 of 3 candidates per image.
    planted_set = {(p["key"], p["planted"]) for p in planted}
    verdicts = [(key, c) for key, c in capfilt_noise_report.verdicts(tmp_path / "filtered")]
    wrong_removed = sum(not c["kept"] for key, c in verdicts if (key, c["text"]) in planted_set)
    assert report["wrong_removed"] == wrong_removed / report["planted_found"]
    assert report["sweep"]["0.0"] == {"wrong_removed": 0.0, "right_kept": 1.0, "removal_precision": 0.0}
    assert report["sweep"]["2.0"]["wrong_removed"] == 1.0 and report["sweep"]["2.0"]["right_kept"] == 0.0


def test_the_rates_at_a_kept_share_of_right_captions_are_read_off_the_right_scores():
    right = [(False, float(score), True) for score in range(1, 11)]
    wrong = [(True, 0.5, True), (True, 3.5, True), (True, 11.0, True)]
    point = capfilt_noise_report.at_right_kept(right + wrong, 0.9)
    assert point["threshold"] == 2.0  # keeps 9 of the 10 right captions
    assert point["right_kept"] == 0.9 and point["wrong_removed"] == 1 / 3
    assert point["removal_precision"] == 0.5  # removed: the 0.5 planted and the right 1.0
    assert capfilt_noise_report.at_right_kept(wrong, 0.9) is None


def test_a_set_with_nothing_left_to_plant_is_an_error_not_an_endless_search(tmp_path, capsys):
    import random
    captions = [["a dog"], ["a dog"], ["a cat", "a dog"]]
    # Draws alone would rarely find it: the exhaustive pass does.
    assert make_noisy_shards._donation(captions, ["a dog"], 0, random.Random(0), draws=0) == (2, "a cat")
    try:
        make_noisy_shards.plant([["a dog"], ["a dog"]], 0.5, seed=0)  # each carries the other's only caption
    except ValueError as err:
        assert "nothing to plant" in str(err)
    else:
        raise AssertionError("planting into a set with no foreign caption must fail")


def test_report_errors_name_the_problem(tmp_path, capsys):
    plant(tmp_path / "noisy")
    planted = str(tmp_path / "noisy/planted.jsonl")
    # The noisy shards themselves are not a CapFilt output.
    assert capfilt_noise_report.main(["--planted", planted, "--filtered", str(tmp_path / "noisy")]) == 2
    assert "not a CapFilt output" in capsys.readouterr().err
    assert capfilt_noise_report.main(["--planted", str(tmp_path / "missing.jsonl"),
                                      "--filtered", str(tmp_path / "noisy")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err

"""CapFilt on a tiny model: provenance, resume = uninterrupted, rank split = one process,
a truncated shard is a counted skip, keep/drop rules, and the pipeline's errors."""
from __future__ import annotations

import functools
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from test_caption import REPO, caption_model_dir
from test_retrieval_support import _ROOT, tiny_shards
from vlp.caption import capfilt_stats
from vlp.caption.capfilt import CapFilt, CapFiltSettings, _choose
from vlp.data.tar import tar_entries, tar_samples

# BLIP's filter (ITM scores, images left without a caption dropped); CSLS has its own tests.
SETTINGS = dict(synthetic=2, score="itm", threshold=None, top_m=2, empty="drop", batch_size=4, max_new_tokens=5)


def capfilt(**kw) -> CapFilt:
    from vlp.model import load_model_dir

    model, cfg, tokenizer = load_model_dir(caption_model_dir())
    return CapFilt(model, tokenizer, cfg.data, CapFiltSettings(**{**SETTINGS, **kw}))


def run(out: Path, rank: int = 0, world: int = 1, **kw) -> dict:
    return capfilt(**kw).run(list(tiny_shards()), out, rank, world, model_name="tiny")


@functools.lru_cache(maxsize=None)
def reference_run() -> Path:
    """One uninterrupted single-process run, shared by the comparisons."""
    out = _ROOT / "capfilt-reference"
    run(out)
    return out


def outputs(out: Path) -> dict[str, bytes]:
    """Every file a run leaves that must not depend on how it was run."""
    names = [p for p in out.iterdir() if p.suffix in (".tar", ".json")] + list((out / "capfilt").iterdir())
    return {str(p.relative_to(out)): p.read_bytes() for p in names}


def samples(path: Path) -> dict[str, dict[str, bytes]]:
    with open(path, "rb") as stream:
        return {key: {Path(name).name.split(".", 1)[1]: data for name, _, data in members}
                for key, members in tar_samples(stream)}


def test_outputs_keep_everything_and_record_every_candidate():
    out = reference_run()
    summary = json.loads((out / "capfilt.json").read_text())
    assert summary["images"] == {"read": 30, "written": 30, "dropped": 0}  # top-m keeps 2 of each
    assert summary["skipped"] == {"bad_image": 1}
    assert summary["captions"]["original"]["candidates"] == 60
    assert summary["captions"]["original"]["kept"] + summary["captions"]["synthetic"]["kept"] == 60
    assert json.loads((out / "sizes.json").read_text()) == {"part0-000000.tar": 10, "part1-000000.tar": 10,
                                                            "part2-000000.tar": 10}
    assert (out / "capfilt_scores.png").stat().st_size > 1000
    source = samples(Path(tiny_shards()[1]))
    filtered = samples(out / "part1-000000.tar")
    assert list(filtered) == list(source)  # same keys, same order
    for key, members in filtered.items():
        assert members["jpg"] == source[key]["jpg"]  # image bytes copied unchanged
        meta = json.loads(members["json"])
        original = json.loads(source[key]["json"])
        assert meta["n"] == original["n"]  # other json fields kept
        entries = meta["capfilt"]
        assert all(set(e) == {"text", "source", "score", "kept"} for e in entries)
        assert [e["text"] for e in entries if e["source"] == "original"] == \
            [source[key]["txt"].decode(), *original["captions"]]
        assert 0 < sum(e["source"] == "synthetic" for e in entries) <= 2
        kept = sorted((e for e in entries if e["kept"]), key=lambda e: -e["score"])
        assert len(kept) == 2 and all(0.0 <= e["score"] <= 1.0 for e in entries)
        assert members["txt"].decode() == kept[0]["text"] and meta["captions"] == [kept[1]["text"]]


def test_filtering_alone_needs_no_decoder(tmp_path):
    """A model trained without captioning has no decoder: it cannot write synthetic captions
    (a clear error), but it can filter the originals by ITC."""
    from vlp.model import load_model_dir

    model, cfg, tokenizer = load_model_dir(caption_model_dir())
    model.decoder = None  # as a model trained with loss.lm: 0 is built
    with pytest.raises(ValueError, match="loss.lm: 0"):
        CapFilt(model, tokenizer, cfg.data, CapFiltSettings(**{**SETTINGS, "synthetic": 1}))
    settings = CapFiltSettings(**{**SETTINGS, "synthetic": 0, "score": "itc", "top_m": 1})
    CapFilt(model, tokenizer, cfg.data, settings).run(list(tiny_shards()), tmp_path, 0, 1, model_name="tiny")
    summary = json.loads((tmp_path / "capfilt.json").read_text())
    original = summary["captions"]["original"]
    assert original["candidates"] == 60 and original["kept"] == 30
    assert summary["captions"]["synthetic"]["candidates"] == 0


def test_filtered_shards_load_with_their_kept_captions():
    from vlp.data import eval_loader
    from vlp.config import DataConfig

    out = reference_run()
    cfg = DataConfig(val=str(out / "part{0..2}-000000.tar"), image_size=16, eval_batch_size=64, workers=0)
    (batch,) = list(eval_loader(cfg, None, rank=0, world_size=1))
    assert len(batch["key"]) == 30 and len(batch["text"]) == 60 and not batch["skipped"]


def test_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    real_save, calls = capfilt_stats.save_shard_stats, []

    def killed_on_the_second_shard(out_dir, name, stats):
        calls.append(name)
        if len(calls) == 2:  # its tar is written, its stats are not: it must be redone
            raise KeyboardInterrupt("killed")
        real_save(out_dir, name, stats)
    monkeypatch.setattr(capfilt_stats, "save_shard_stats", killed_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        run(out)
    first_done = (out / "part0-000000.tar").stat().st_mtime_ns
    assert not (out / "capfilt.json").exists()
    monkeypatch.setattr(capfilt_stats, "save_shard_stats", real_save)
    run(out)
    assert (out / "part0-000000.tar").stat().st_mtime_ns == first_done  # not redone
    assert outputs(out) == outputs(reference_run())


def test_rank_split_and_merge_equal_one_process(tmp_path):
    out = tmp_path / "split"
    partial = run(out, rank=1, world=2)
    assert partial["waiting_for"] == 2 and not (out / "capfilt.json").exists()
    summary = run(out, rank=0, world=2)
    assert summary["images"]["written"] == 30
    assert outputs(out) == outputs(reference_run())


def test_changed_settings_are_refused_on_resume(tmp_path):
    out = tmp_path / "changed"
    shutil.copytree(reference_run() / "capfilt", out / "capfilt")
    with pytest.raises(ValueError, match="synthetic: 2 -> 1"):
        run(out, synthetic=1)


def test_settings_may_change_while_no_shard_is_finished(tmp_path):
    """A first run that failed before finishing a shard (say, out of memory at its batch
    size) must not lock the directory to the settings that failed."""
    out = tmp_path / "retried"
    capfilt_stats.check_settings(out, {**SETTINGS, "batch_size": 64, "model": "tiny"})
    (out / "part0-000000.tar").write_bytes(b"half a shard, never finished")
    summary = run(out)
    assert summary["settings"]["batch_size"] == SETTINGS["batch_size"]
    assert outputs(out) == outputs(reference_run())


def test_a_shard_cut_inside_a_member_is_a_counted_skip(tmp_path):
    source = Path(tiny_shards()[2])
    with open(source, "rb") as stream:
        entries = list(tar_entries(stream))  # jpg, json, txt per sample
    name, offset, data = entries[13]  # the fifth sample's json
    shard = tmp_path / "in" / "cut-000000.tar"
    shard.parent.mkdir()
    shard.write_bytes(source.read_bytes()[:offset + len(data) // 2])
    out = tmp_path / "out"
    summary = capfilt().run([str(shard)], out, model_name="tiny")
    assert summary["skipped"] == {"bad_tar": 1}
    assert summary["images"]["read"] == 4  # the samples before the damaged one
    assert list(samples(out / "cut-000000.tar")) == [e[0].split(".")[0] for e in entries[:12:3]]


def test_keep_rules_threshold_top_m_and_empty_images():
    def cands(*scores):
        return [{"text": str(i), "source": "original", "score": s, "kept": False} for i, s in enumerate(scores)]

    def kept(c):
        return [x["text"] for x in c if x["kept"]]
    c = cands(0.9, 0.2, 0.6)
    _choose(c, CapFiltSettings(threshold=0.5, empty="drop"), 0.5)
    assert kept(c) == ["0", "2"]
    c = cands(0.9, 0.2, 0.6)
    _choose(c, CapFiltSettings(threshold=0.5, top_m=1, empty="drop"), 0.5)
    assert kept(c) == ["0"]
    c = cands(0.1, 0.3)
    _choose(c, CapFiltSettings(threshold=0.5, empty="drop"), 0.5)
    assert kept(c) == []
    c = cands(0.1, 0.3)
    _choose(c, CapFiltSettings(threshold=0.5, empty="best"), 0.5)
    assert kept(c) == ["1"]
    for fallback, expected in ((0.25, ["1"]), (0.35, []), (None, ["1"])):  # likely: best only past the fallback
        c = cands(0.1, 0.3)
        _choose(c, CapFiltSettings(empty="likely"), 0.5, fallback)
        assert kept(c) == expected
    with pytest.raises(ValueError, match="empty 'likely' reads the mixture"):
        CapFiltSettings(threshold=0.5, empty="likely").check()
    CapFiltSettings(threshold=None, top_m=2, empty="likely").check()  # top-m alone leaves no image empty
    with pytest.raises(ValueError, match="threshold, a top_m"):
        CapFiltSettings(threshold=None, top_m=0).check()


def test_images_without_a_kept_caption_are_dropped_or_keep_their_best(tmp_path):
    dropped = run(tmp_path / "drop", threshold=1.01, top_m=0, synthetic=0)
    assert dropped["images"] == {"read": 30, "written": 0, "dropped": 30}
    assert samples(tmp_path / "drop" / "part0-000000.tar") == {}
    listed = [json.loads(line) for line in (tmp_path / "drop/capfilt/part0-000000.tar.dropped.jsonl").open()]
    assert [d["key"] for d in listed] == [f"00{i:04d}" for i in range(10)]  # the audit keeps them
    assert all(len(d["capfilt"]) == 2 and not any(c["kept"] for c in d["capfilt"]) for d in listed)
    best = run(tmp_path / "best", threshold=1.01, top_m=0, synthetic=0, empty="best")
    assert best["images"]["written"] == 30 and best["captions"]["original"]["kept"] == 30


def test_pipeline_errors_are_clear(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "pipelines"))
    import capfilt as capfilt_cli

    base = ["--model", str(caption_model_dir()), "--shards", tiny_shards()[0], "--out", str(tmp_path / "o")]
    assert capfilt_cli.main(base + ["--rank", "2", "--world", "2"]) == 2
    assert "--rank must be in" in capsys.readouterr().err
    assert capfilt_cli.main(base + ["--no-threshold"]) == 2
    assert "threshold, a top_m" in capsys.readouterr().err
    assert capfilt_cli.main(["--model", str(tmp_path / "nope"), "--shards", tiny_shards()[0],
                             "--out", str(tmp_path / "o")]) == 2
    assert "model directory not found" in capsys.readouterr().err


def test_csls_is_the_formula_in_slices_and_demotes_a_caption_close_to_every_image():
    import torch
    from vlp.caption.capfilt import _csls_scores

    gen = torch.Generator().manual_seed(0)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=gen), dim=-1)  # noqa: E731
    images, texts = unit(7, 8), unit(11, 8)
    owner = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 6, 6, 6])
    sim = texts @ images.T
    expected = 2 * sim[torch.arange(11), owner] - sim.topk(3, dim=1).values.mean(1) \
        - sim.topk(3, dim=0).values.mean(0)[owner]
    # Two batches of the shard (images 0-3 and 4-6), owners local to their batch, scored 4 rows at a time.
    pools = [(images[:4], texts[:6], owner[:6]), (images[4:], texts[6:], owner[6:] - 4)]
    assert torch.allclose(_csls_scores(pools, k=3, rows=4), expected, atol=1e-5)

    # Images share a direction e0 plus one of their own; the hub caption is e0 itself. On the
    # cosine it beats image 0's own caption (mostly e1, a little against e0), on CSLS it does not.
    images = torch.nn.functional.normalize(torch.eye(5)[1:] + torch.eye(5)[0], dim=-1)
    hub, right = torch.eye(5)[0], torch.nn.functional.normalize(torch.eye(5)[1] - 0.1 * torch.eye(5)[0], dim=0)
    assert float(hub @ images[0]) > float(right @ images[0])
    hub_score, right_score = _csls_scores([(images, torch.stack([hub, right]), torch.tensor([0, 0]))], k=2)
    assert right_score > hub_score + 0.2


def test_csls_with_automatic_thresholds_runs_end_to_end_and_splits_like_one_process(tmp_path):
    settings = dict(score="csls", csls_k=3, synthetic=1, threshold="auto", top_m=0, empty="best")
    whole = run(tmp_path / "whole", **settings)
    assert whole["settings"]["score"] == "csls" and whole["images"]["written"] == 30
    assert set(whole["thresholds"]) == {"part0-000000.tar", "part1-000000.tar", "part2-000000.tar"}
    for name, threshold in whole["thresholds"].items():
        for meta in (json.loads(m["json"]) for m in samples(tmp_path / "whole" / name).values()):
            for c in meta["capfilt"]:  # kept = at or above the shard's split (or the image's best)
                assert c["kept"] == (c["score"] >= threshold) or c["score"] == max(x["score"] for x in meta["capfilt"])
    run(tmp_path / "split", rank=1, world=2, **settings)
    run(tmp_path / "split", rank=0, world=2, **settings)
    assert outputs(tmp_path / "split") == outputs(tmp_path / "whole")


def test_the_mixture_threshold_splits_two_populations_between_them():
    from vlp.caption.capfilt import mixture_split
    rng = np.random.default_rng(0)
    wrong, right = rng.normal(-0.4, 0.1, 400), rng.normal(0.1, 0.15, 600)
    threshold, fallback = mixture_split([*wrong, *right])
    assert -0.3 < threshold < 0.0
    assert (wrong < threshold).mean() > 0.9 and (right >= threshold).mean() > 0.9
    assert fallback == pytest.approx((wrong.mean() + threshold) / 2, abs=0.02)  # halfway from the low mean
    assert mixture_split([0.2, 0.2, 0.2, 0.2, 0.2]) is None and mixture_split([0.1, 0.5]) is None
    with pytest.raises(ValueError, match="threshold must be a number, 'auto'"):
        CapFiltSettings(threshold="half").check()


def test_the_command_lines_defaults_are_the_settings_defaults():
    from pipelines.capfilt import parse_args, settings_from

    args = parse_args(["--model", "m", "--shards", "s.tar", "--out", "o"])
    assert settings_from(args) == CapFiltSettings()
    blip = settings_from(parse_args(["--model", "m", "--shards", "s.tar", "--out", "o",
                                     "--score", "itm", "--threshold", "0.5", "--empty", "drop"]))
    assert (blip.score, blip.threshold, blip.empty) == ("itm", 0.5, "drop")

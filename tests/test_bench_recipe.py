"""tools/bench_recipe.py without training: budget arithmetic, log parsing, scoring from
embeddings, the eval set's skips, aggregation over seeds and the report."""
import importlib.util
import io
import time
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlp.config import DataConfig
from vlp.data.writer import ShardWriter, write_sizes

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_recipe", ROOT / "tools" / "bench_recipe.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_recipe"] = bench  # dataclasses look their module up by name
_spec.loader.exec_module(bench)


# --------------------------------------------------------------------------- budget arithmetic

def test_steps_within_counts_the_slow_start_as_measured():
    times = [5.0, 2.0, 1.0, 1.0, 1.0, 1.0]  # 7 s of start-up, then 1 s a step
    assert bench.steady_step_seconds(times, skip=2) == 1.0
    assert bench.steps_within(times, budget_s=60, skip=2) == 2 + 53
    # A budget shorter than the start-up still trains the measured first steps.
    assert bench.steps_within(times, budget_s=3, skip=2) == 2
    assert bench.steps_within([0.5, 0.5], budget_s=10, skip=0) == 20


def test_a_burst_of_slow_steps_does_not_set_the_step_count():
    times = [5.0, 2.0] + [1.0] * 20 + [8.0] * 5  # another process slowed 5 steps
    assert bench.steady_step_seconds(times, skip=2) == 1.0
    assert bench.steps_within(times, budget_s=60, skip=2) == 2 + 53


def test_steps_within_short_probe_and_minimum():
    assert bench.steps_within([4.0, 2.0], budget_s=100, skip=3) == 2 + 47  # steady = the last step
    assert bench.steps_within([1.0, 2.0, 6.0], budget_s=10, skip=0) == 5  # the median, 2 s
    assert bench.steps_within([10.0], budget_s=1, skip=0) == 1
    with pytest.raises(ValueError, match="no step times"):
        bench.steady_step_seconds([], skip=0)


def test_vlp_budget_lets_the_time_decide_and_keeps_the_warmup_share():
    from vlp.config import TrainConfig
    assert bench.vlp_budget(TrainConfig(steps=240, warmup_steps=30), 5) == [
        "train.max_minutes=5", "train.warmup_fraction=0.125", "train.steps=1000000"]
    assert bench.vlp_budget(TrainConfig(steps=240, warmup_steps=30, warmup_fraction=0.2), 2.5)[:2] == [
        "train.max_minutes=2.5", "train.warmup_fraction=0.2"]


def test_variants_are_more_vlp_arms_with_their_own_overrides(tmp_path, capsys):
    python = tmp_path / "python"
    python.touch()
    args = bench.parse_args(["--openclip-python", str(python), "--set", "train.precision=fp32",
                             "--variant", "late", "loss.itm.start=0.8", "loss.lm.start=0.8",
                             "--variant", "frozen", "model.text.frozen_layers=2"])
    assert bench.vlp_arms(args.variant) == [("vlp", []), ("late", ["loss.itm.start=0.8", "loss.lm.start=0.8"]),
                                            ("frozen", ["model.text.frozen_layers=2"])]
    b = bench.Bench(args, tmp_path, 300.0, 64, ["train.max_minutes=5"])
    command = b.vlp_command(tmp_path / "late-seed0", 0, ["loss.itm.start=0.8"])
    # The variant's overrides come last, so they win over --set and the budget.
    assert command[-3:] == ["train.max_minutes=5", "train.precision=fp32", "loss.itm.start=0.8"]
    # The vlp arms match open_clip's measured time, not the nominal budget.
    matched = b.vlp_command(tmp_path / "vlp-seed0", 0, [], b.budget_of(348.6))
    assert "train.max_minutes=5.8100" in matched and "train.max_minutes=5" not in matched
    for clash in (["vlp", "x=1"], ["open_clip"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--openclip-python", str(python), "--variant", *clash])
        assert "--variant names" in capsys.readouterr().err


def test_warmup_steps_fraction():
    assert bench.warmup_steps(300, 0.1) == 30
    assert bench.warmup_steps(4, 0.1) == 1


# --------------------------------------------------------------------------- step times from logs

def test_openclip_step_times_from_its_log():
    text = ("2026-12-01,18:40:01 | INFO | Train Epoch: 0 [   64/1280 (5%)] Data (t): 0.512 Batch (t): 3.101, "
            "20.6385/s, 20.6385/s/gpu LR: 0.000050 Logit Scale: 14.286 Contrastive_loss: 4.1589 (4.1589) "
            "Loss: 4.1589 (4.1589)\n"
            "2026-12-01,18:40:02 | INFO | Train Epoch: 0 [  128/1280 (10%)] Data (t): 0.001 Batch (t): 1.250, "
            "51.2/s, 51.2/s/gpu LR: 0.000100\n"
            "2026-12-01,18:40:02 | INFO | Start epoch 1\n")
    assert bench.openclip_step_times(text) == [3.101, 1.25]


def test_vlp_step_times_from_metrics(tmp_path):
    (tmp_path / "config.yaml").write_text("data:\n  batch_size: 8\ntrain:\n  grad_accum: 2\n")
    lines = [{"step": 1, "kind": "train", "samples_per_s": 32.0, "samples_per_s_per_rank": 16.0},  # 2 ranks
             {"step": 3, "kind": "train", "samples_per_s": 64.0, "samples_per_s_per_rank": 32.0},
             {"step": 3, "kind": "eval", "itc": {}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    # 8 x 2 micro-batches x 2 ranks = 32 samples a step.
    assert bench.vlp_step_times(tmp_path) == [1.0, 0.5, 0.5]


# --------------------------------------------------------------------------- scoring

def _unit(rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_score_recall_and_zeroshot_from_embeddings():
    images = _unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    # Captions 0 and 1 point at their images, caption 2 at image 0; image 2's best caption is 1.
    captions = _unit([[1, 0.1, 0], [0, 1, 0.5], [1, 0, 0.2]])
    zs_images = _unit([[1, 0, 0], [0, 1, 0], [0, 0.9, 1]])
    # Two classes, one template each; "none" prompts are swapped, "simple" right.
    simple = _unit([[1, 0, 0], [0, 1, 1]])
    none = _unit([[0, 1, 1], [1, 0, 0]])
    emb = {"val_images": images, "captions": captions, "zeroshot_images": zs_images,
           "prompts_simple": simple, "prompts_none": none}
    out = bench.score(emb, torch.tensor([0, 1, 1]), n_classes=2)
    assert out["t2i_r1"] == pytest.approx(2 / 3)
    assert out["t2i_r10"] == 1.0
    assert out["i2t_r1"] == pytest.approx(2 / 3)
    assert out["zeroshot_simple_top1"] == 1.0
    assert out["zeroshot_none_top1"] == 0.0


def test_score_averages_templates_per_class():
    # Two templates for each of two classes (class-major): class 1's prompts average to the
    # image's direction although neither prompt alone is closest to it.
    emb = {"val_images": _unit([[1, 0]]), "captions": _unit([[1, 0]]),
           "zeroshot_images": _unit([[0, 1]]),
           "prompts_simple": _unit([[0.6, 0.8], [0.6, 0.8], [1, 0.95], [-1, 0.95]]),
           "prompts_none": _unit([[0, 1], [0, 1], [1, 0], [1, 0]])}
    out = bench.score(emb, torch.tensor([1]), n_classes=2)
    assert out["zeroshot_simple_top1"] == 1.0
    assert out["zeroshot_none_top1"] == 0.0


def test_prompt_sets_are_class_major():
    sets = bench.prompt_sets(["cat", "dog"])
    assert sets == {"prompts_simple": ["a photo of a cat.", "a photo of a dog."], "prompts_none": ["cat", "dog"]}


# --------------------------------------------------------------------------- eval sets

def _jpg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def test_eval_set_first_caption_labels_and_counted_skips(tmp_path):
    writer = ShardWriter(tmp_path, "val", maxcount=10)
    for key, meta in (("a", {"group": "red", "captions": ["more words"]}), ("b", {"group": "blue"}),
                      ("c", {"group": "green"}), ("d", {})):
        writer.write({"__key__": key, "jpg": _jpg(), "txt": f"name {key}", "json": meta})
    write_sizes(tmp_path, writer.close())
    cfg = DataConfig(workers=0, image_size=16, eval_batch_size=3)
    spec = str(tmp_path / "val-000000.tar")
    retrieval = bench.load_eval_set(cfg, spec)
    assert retrieval.keys == ["a", "b", "c", "d"]
    assert retrieval.captions == ["name a", "name b", "name c", "name d"]
    assert sum(len(b) for b in retrieval.images) == 4 and retrieval.images[0].dtype == torch.uint8
    zeroshot = bench.load_eval_set(cfg, spec, "group", {"red": 0, "blue": 1})
    assert zeroshot.keys == ["a", "b"] and zeroshot.labels == [0, 1]
    assert sum(len(b) for b in zeroshot.images) == 2
    assert zeroshot.skipped == {"label not in the class list": 1, "no 'group' field": 1}


# --------------------------------------------------------------------------- aggregation and report

def _run(arm, seed, value, seconds):
    return {"arm": arm, "seed": seed, "steps": 10 + seed, "train_seconds": seconds, "wall_seconds": seconds + 20,
            "metrics": {m: value for m in list(bench.METRIC_TITLES)[:6]}}


def test_summarize_mean_and_spread_per_arm():
    runs = [_run("vlp", 0, 0.5, 300), _run("open_clip", 0, 0.2, 290), _run("vlp", 1, 0.7, 302),
            _run("open_clip", 1, 0.4, 310), _run("vlp", 2, 0.6, 298), _run("open_clip", 2, 0.3, 300)]
    summary = bench.summarize(runs)
    assert list(summary) == ["vlp", "open_clip"]
    assert summary["vlp"]["t2i_r10"]["mean"] == pytest.approx(0.6)
    assert summary["vlp"]["t2i_r10"]["sd"] == pytest.approx(0.1)
    assert (summary["open_clip"]["zeroshot_none_top1"]["min"], summary["open_clip"]["zeroshot_none_top1"]["max"]) \
        == (0.2, 0.4)
    assert summary["open_clip"]["train_seconds"]["mean"] == pytest.approx(300)
    assert bench.spread([0.3])["sd"] == 0.0
    table = bench.markdown({"summary": summary, "runs": runs})
    assert "| vlp | 0.500 ± 0.000" not in table and "| vlp | 0.600 ± 0.100" in table
    assert "| open_clip | 2 | 0.300 |" in table


def test_missing_openclip_python_says_how_to_make_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        bench.parse_args(["--openclip-python", str(tmp_path / "nope/python")])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert "python3 -m venv .bench/openclip-venv" in message and "open-clip-torch[training]" in message


def test_run_logged_cuts_at_the_limit_and_reports_failures(tmp_path):
    started = time.perf_counter()
    wall, finished = bench.run_logged([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
                                      tmp_path / "slow.log", {}, limit_s=1.0)
    assert not finished and wall < 30 and time.perf_counter() - started < 30
    assert (tmp_path / "slow.log").read_text() == "up\n"
    assert bench.run_logged([sys.executable, "-c", "print('ok')"], tmp_path / "ok.log", {})[1]
    with pytest.raises(RuntimeError, match=r"exited 3 .*\n.*broken"):
        bench.run_logged([sys.executable, "-c", "import sys; print('broken'); sys.exit(3)"], tmp_path / "bad.log", {})


def test_foil_tests_score_both_arms_alike_from_their_embeddings(tmp_path):
    """Two images, each with its caption and a foil; embeddings made so that image a picks
    its caption and image b picks its foil: ITC foil accuracy 1/2, per type too."""
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    lines = [{"image": "a.jpg", "caption": "a cat left of a dog", "foils": ["a dog left of a cat"], "type": "swap"},
             {"image": "b.jpg", "caption": "a red cup", "foils": ["a cup red"], "type": "shuffle"}]
    (tmp_path / "foils.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    foils = bench.FoilEval.read(str(tmp_path / "foils.jsonl"), None)
    assert len(foils.files) == 2 and len(foils.texts) == 4
    images = torch.eye(4)[:2]                        # a = e0, b = e1
    text_rows = {"a cat left of a dog": 0, "a dog left of a cat": 3, "a red cup": 2, "a cup red": 1}
    texts = torch.stack([torch.eye(4)[text_rows[t]] for t in foils.texts])
    report = foils.report(images, texts)
    assert report["itc"] == 0.5 and report["chance"] == 0.5
    assert report["by_type"]["swap"]["itc"] == 1.0 and report["by_type"]["shuffle"]["itc"] == 0.0
    metrics = bench.score({"val_images": images, "captions": images, "foil_images": images, "foil_texts": texts},
                          None, 0, foils)
    assert metrics["foils_itc"] == 0.5 and "zeroshot_simple_top1" not in metrics


# --------------------------------------------------------------------------- tools/ablate.py

def _ablate():
    spec = importlib.util.spec_from_file_location("ablate", ROOT / "tools" / "ablate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ablation(path: Path, budget: float, seed: int, r1: dict[str, float]) -> Path:
    runs = [{"dataset": "demo", "variant": v, "seed": seed, "steps": 10, "train_seconds": 60.0,
             "metrics": {"itc_t2i_r1": value, "seconds_per_step": 6.0}} for v, value in r1.items()]
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(
        {"command": f"seed {seed}", "budget_minutes": budget, "variants": {v: [] for v in r1},
         "datasets": {"demo": {}}, "runs": runs}))
    return path / "results.json"


def test_ablations_run_apart_pool_into_one_table(tmp_path):
    ablate = _ablate()
    a = _ablation(tmp_path / "a", 4, 0, {"fixed": 0.2, "dwa": 0.3})
    b = _ablation(tmp_path / "b", 4, 1, {"fixed": 0.4, "dwa": 0.5})
    merged = ablate.merge([a, b], tmp_path / "all", bench.spread)
    assert len(merged["runs"]) == 4
    assert merged["summary"]["demo/fixed"]["itc_t2i_r1"]["mean"] == pytest.approx(0.3)
    assert merged["summary"]["demo/dwa"]["runs"] == 2
    assert json.loads((tmp_path / "all/results.json").read_text())["merged_from"] == [str(a), str(b)]
    table = (tmp_path / "all/results.md").read_text()
    assert "| demo | dwa | 0.400 ± 0.141" in table
    assert "zeroshot" not in table and "foils" not in table  # no run measured them: no column
    assert (tmp_path / "all/results.png").stat().st_size > 0
    c = _ablation(tmp_path / "c", 3, 2, {"fixed": 0.1})
    with pytest.raises(SystemExit, match="different budgets"):
        ablate.merge([a, c], tmp_path / "mixed", bench.spread)


def test_a_data_set_without_classes_is_scored_by_its_val_split_and_foil_test(tmp_path):
    """The relations set's shape: val shards and a foil file, no class list. The scores are
    the training eval's recall and vlp's own foil report, and no zero-shot key appears."""
    from test_retrieval_support import COLORS, SHAPES, shape_image, tiny_model_dir, tiny_shards
    from vlp.foils import evaluate_foils, read_foils
    from vlp.model import load_model_dir

    for i, (color, shape) in enumerate(zip(COLORS, SHAPES)):
        (tmp_path / f"{color}_{shape}.jpg").write_bytes(shape_image(color, shape, i))
    lines = [{"image": f"{c}_{s}.jpg", "caption": f"a {c} {s}", "foils": [f"a {s} {c}"]}
             for c, s in zip(COLORS, SHAPES)]
    (tmp_path / "foils.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    val = tiny_shards(1, 10, corrupt=False)[0]
    spec = {"train": val, "val": val, "foils": str(tmp_path / "foils.jsonl"), "foil_images": str(tmp_path)}
    model_dir = tiny_model_dir()
    model, cfg, tokenizer = load_model_dir(model_dir)

    metrics = _ablate().RunScorer(bench, cfg.data, spec)(model_dir)

    want = evaluate_foils(model.float().eval(), tokenizer, read_foils(spec["foils"], spec["foil_images"]), cfg.data)
    assert {f"foils_{name}": want[name] for name in ("itc", "filip", "itm", "rerank") if name in want} == {
        k: v for k, v in metrics.items() if k.startswith("foils_")}
    assert "foils_itc" in metrics and 0 <= metrics["itc_t2i_r1"] <= 1
    assert not any(k.startswith("zeroshot") for k in metrics)

"""tools/capfilt_demo.py's bootstrapping rounds: each round after the first filters the noisy
shards with the model the previous round trained, and each round is reported. The steps
themselves (pretraining, CapFilt) have their own tests; here they are replaced by a fake
that writes what each step would leave behind."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
R10 = {"clean": 0.7, "noisy": 0.3, "judge": 0.4, "filtered": 0.5, "filtered_round2": 0.6}


@pytest.fixture
def demo(monkeypatch):
    spec = importlib.util.spec_from_file_location("capfilt_demo", ROOT / "tools" / "capfilt_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    commands = []

    def fake_step(done: Path, command: list[str], log=None) -> None:
        commands.append(command)
        done.parent.mkdir(parents=True, exist_ok=True)
        if done.name == "eval.json":
            done.write_text(json.dumps({"itc": {"t2i_r1": R10[done.parent.name] / 2, "t2i_r10": R10[done.parent.name]}}))
        elif done.name == "capfilt.json":
            done.write_text(json.dumps({"captions": {"kept": len(commands)}}))
        elif done.name.startswith("filter_report"):
            done.write_text("progress\n" + json.dumps({"wrong_removed": 0.7 if "round" not in done.name else 0.8,
                                                       "right_kept": 0.9, "removal_precision": 0.85}) + "\n")
        else:
            done.write_text("")

    monkeypatch.setattr(module, "step", fake_step)
    return module, commands


def test_a_second_round_filters_the_noisy_shards_with_the_first_rounds_model(demo, tmp_path, capsys):
    module, commands = demo
    assert module.main([str(tmp_path), "--train", "data/train-{0..1}.tar", "--val", "data/val-0.tar",
                        "--capfilt", "--synthetic 1 --score csls", "--rounds", "2", "--", "loss.lm=1",
                        "train.max_minutes=1"]) == 0
    capfilts = [c for c in commands if "pipelines/capfilt.py" in c]
    assert len(capfilts) == 2
    model = lambda c: c[c.index("--model") + 1]  # noqa: E731
    shards = lambda c: c[c.index("--shards") + 1]  # noqa: E731
    assert model(capfilts[0]) == str(tmp_path / "noisy" / "model")
    assert model(capfilts[1]) == str(tmp_path / "filtered" / "model")
    assert shards(capfilts[0]) == shards(capfilts[1]) == str(tmp_path / "noisy_shards" / "train-{0..1}.tar")
    # Round 2 adds --refilter's flags after --capfilt's, so its --synthetic 0 wins.
    assert capfilts[1][-4:] == ["--score", "csls", "--synthetic", "0"]
    pretrains = [c for c in commands if "pipelines/pretrain.py" in c]
    assert [c[4] for c in pretrains] == [f"output_dir={tmp_path / arm}" for arm in R10 if arm != "judge"]
    assert all(c[-1] == "train.max_minutes=1" for c in pretrains)
    assert pretrains[-1][2] == f"data.train={tmp_path / 'round2_shards' / 'train-{0..1}.tar'}"

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["arm"] for r in summary["rounds"]] == ["filtered", "filtered_round2"]
    assert summary["rounds"][0]["r10_recovered_share"] == pytest.approx(0.5)
    assert summary["rounds"][1]["r10_recovered_share"] == pytest.approx(0.75)
    assert summary["rounds"][1]["filter"]["wrong_removed"] == 0.8
    assert summary["r10_recovered_share"] == pytest.approx(0.5)  # the single-round field stays round 1's
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary


def test_judge_overrides_train_a_separate_judge_that_filters_round_one(demo, tmp_path):
    module, commands = demo
    assert module.main([str(tmp_path), "--train", "t-{0..1}.tar", "--val", "v.tar",
                        "--judge-overrides", "loss.itc.drop_hardest=0.3 loss.lm=1", "--", "train.max_minutes=1"]) == 0
    pretrains = {c[4].rsplit("/", 1)[-1]: c for c in commands if "pipelines/pretrain.py" in c}
    assert list(pretrains) == ["clean", "noisy", "judge", "filtered"]
    assert pretrains["judge"][2] == pretrains["noisy"][2] == f"data.train={tmp_path / 'noisy_shards' / 't-{0..1}.tar'}"
    assert pretrains["judge"][-3:] == ["train.max_minutes=1", "loss.itc.drop_hardest=0.3", "loss.lm=1"]
    assert all(pretrains[arm][-1] == "train.max_minutes=1" for arm in ("clean", "noisy", "filtered"))
    capfilt = next(c for c in commands if "pipelines/capfilt.py" in c)
    assert capfilt[capfilt.index("--model") + 1] == str(tmp_path / "judge" / "model")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["arms"]["judge"]["t2i_r10"] == 0.4
    # The noise's cost and the recovery are measured on the plain recipe's noisy arm, not the judge's.
    assert summary["r10_lost_to_noise"] == pytest.approx(0.4)
    assert summary["r10_recovered_share"] == pytest.approx(0.5)


def test_rounds_below_one_are_refused(demo, tmp_path, capsys):
    module, commands = demo
    with pytest.raises(SystemExit):
        module.main([str(tmp_path), "--train", "t.tar", "--val", "v.tar", "--rounds", "0"])
    assert "--rounds must be at least 1" in capsys.readouterr().err
    assert commands == []


def test_a_filter_the_judge_cannot_run_is_refused_before_any_training(demo, tmp_path, capsys):
    module, commands = demo
    with pytest.raises(SystemExit, match="needs a captioner"):  # CapFilt's default --synthetic 1, ITC-only config
        module.main([str(tmp_path), "--train", "t.tar", "--val", "v.tar"])
    with pytest.raises(SystemExit, match="needs an ITM head"):
        module.main([str(tmp_path), "--train", "t.tar", "--val", "v.tar", "--capfilt", "--synthetic 0 --score itm"])
    with pytest.raises(SystemExit, match="unknown"):  # a misspelt override, before any training too
        module.main([str(tmp_path), "--train", "t.tar", "--val", "v.tar", "--capfilt", "--synthetic 0", "--",
                     "loss.lmm=1"])
    assert commands == []
    # The judge's own overrides give it the captioner.
    assert module.main([str(tmp_path), "--train", "t.tar", "--val", "v.tar", "--judge-overrides", "loss.lm=1"]) == 0


def test_an_interrupted_arm_resumes_or_starts_again(demo, tmp_path):
    module, _ = demo
    arm = tmp_path / "noisy"
    assert module.continuation(arm) == []
    arm.mkdir()
    (arm / "metrics.jsonl").write_text("{}\n")
    assert module.continuation(arm) == ["train.overwrite=true"]  # killed before its first checkpoint
    (arm / "checkpoints" / "step_100").mkdir(parents=True)
    assert module.continuation(arm) == ["train.resume=auto"]


def test_an_interrupted_report_does_not_count_as_done(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("capfilt_demo_real", ROOT / "tools" / "capfilt_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(module.subprocess, "run", interrupted)
    report = tmp_path / "filter_report.json"
    with pytest.raises(KeyboardInterrupt):
        module.step(report, ["report"], report)
    assert not report.exists()
    monkeypatch.undo()
    module.step(report, [sys.executable, "-c", "import json; print(json.dumps({'ok': 1}))"], report)
    assert json.loads(report.read_text()) == {"ok": 1}

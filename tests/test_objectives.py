"""The objective interface: model directories from before it still load, a new objective
is one module (logged, weighted, checkpointed and evaluated with no other edit), SigLIP
trains, the curriculum skips an objective until it starts, and the balancing rules resume
exactly."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from test_model import tiny_batch, tiny_cfg
from test_train import PRETRAIN, REPO, run, shards, write_config  # noqa: F401  (shards: fixture)
from vlp.model import build_model, load_model_dir

DATA = Path(__file__).parent / "data"


def test_a_model_directory_saved_before_the_objective_interface_loads_with_the_same_scores():
    model, cfg, _ = load_model_dir(DATA / "legacy_model_dir")
    want = json.loads((DATA / "legacy_model_scores.json").read_text())
    batch = tiny_batch(b=3)
    with torch.no_grad():
        image_tokens = model.encode_image_tokens(batch["image"])
        text_tokens = model.encode_text_tokens(batch["input_ids"], batch["attention_mask"])
        got = {
            "image": model.encode_image(batch["image"]),
            "text": model.encode_text(batch["input_ids"], batch["attention_mask"]),
            "filip_i2t": model.filip_scores(image_tokens, text_tokens, batch["attention_mask"])[0],
            "itm": model.itm_scores(batch["input_ids"], batch["attention_mask"], batch["image"]),
        }
        generated = model.generate_ids(batch["image"], method="greedy", max_new_tokens=4)
    for name, value in got.items():
        torch.testing.assert_close(value, torch.tensor(want[name]), atol=1e-5, rtol=1e-5, msg=name)
    assert model.logit_scale.item() == pytest.approx(want["logit_scale"], rel=1e-6)
    assert model.filip_logit_scale.item() == pytest.approx(want["filip_logit_scale"], rel=1e-6)
    assert generated.tolist() == want["generated"]
    assert cfg.loss.weighting == "uncertainty" and set(model.weighting.log_vars) == {"itc", "filip", "itm", "lm"}


def test_siglip_alone_trains_the_global_embeddings_and_sets_their_logit_scale():
    torch.manual_seed(0)
    cfg = tiny_cfg(itc=0.0, filip=0.0, itm=0.0, lm=0.0, siglip=1.0)
    model = build_model(cfg).eval()
    assert list(model.objectives) == ["siglip"] and model.logit_scale.item() == pytest.approx(10.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    batch, losses = tiny_batch(b=6), []
    for _ in range(3):
        out = model(batch)
        losses.append(out["siglip"].item())
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    assert losses[-1] < losses[0] and {"siglip_acc", "siglip_bias", "weight_siglip"} <= set(out)


def test_curriculum_runs_no_part_of_an_objective_before_it_starts():
    cfg = tiny_cfg(filip=0.0)
    cfg.loss.lm.start, cfg.loss.lm.ramp = 0.5, 0.25
    model = build_model(cfg)
    calls = []
    model.decoder.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    model.set_training_progress(10, 0.4)
    out = model(tiny_batch())
    assert "lm" not in out and not calls
    model.set_training_progress(20, 0.625)
    out = model(tiny_batch())
    assert calls and out["weight_lm"].item() == pytest.approx(0.5)
    model.eval()  # evaluation always scores every objective at its full weight
    model.set_training_progress(0, 0.0)
    assert model(tiny_batch())["weight_lm"].item() == 1.0


def test_in_a_second_stage_the_towers_run_without_a_graph_and_only_itm_trains():
    """loss.itc.end = loss.itm.start with ITM's tower_gradients false: after the switch the
    step runs ITM alone, its tower states carry no graph, and its gradient reaches only
    the fusion layers and the ITM head; before it, ITC alone trains the towers."""
    cfg = tiny_cfg(filip=0.0, lm=0.0)
    cfg.loss.itc.end = cfg.loss.itm.start = 0.5
    cfg.loss.itm.tower_gradients = False
    model = build_model(cfg)
    states = []
    model.vision.register_forward_hook(lambda _m, _i, out: states.append(out))
    model.set_training_progress(3, 0.4)
    first = model(tiny_batch())
    assert "itm" not in first and "itc" in first and states[-1].requires_grad
    model.set_training_progress(6, 0.6)
    second = model(tiny_batch())
    assert "itc" not in second and "itm" in second and not states[-1].requires_grad
    second["loss"].backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all(n.startswith(("text.fusion.", "itm_head.")) for n in trained), sorted(trained)


TOY_OBJECTIVE = '''
from dataclasses import dataclass
import torch
from vlp.losses.objective import Objective, ObjectiveOptions

@dataclass
class PairDistanceOptions(ObjectiveOptions):
    margin: float = 0.0

class PairDistance(Objective):
    """Pulls each image's embedding towards its caption's: a toy objective in one module."""
    name = "pairdist"
    Options = PairDistanceOptions

    def forward(self, features):
        distance = (features.image_emb - features.text_emb).pow(2).sum(-1)
        return {"loss": (distance - self.options.margin).clamp(min=0).mean(),
                "mean_distance": distance.mean().detach()}
'''

RUN_WITH_TOY = ("import sys, runpy; sys.path.insert(0, sys.argv[1]); import vlp.losses, toy_objective; "
                "vlp.losses.OBJECTIVES += (toy_objective.PairDistance,); "
                "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')")


@pytest.mark.slow
def test_a_new_objective_is_one_module_and_the_trainer_logs_weights_checkpoints_and_evaluates_it(
        shards, tmp_path):
    (tmp_path / "toy_objective.py").write_text(TOY_OBJECTIVE)
    config = write_config(tmp_path / "cfg.yaml", shards["train"], shards["val"], steps=4, checkpoint_every=2)
    run_dir = tmp_path / "run"
    run([sys.executable, "-c", RUN_WITH_TOY, str(tmp_path), PRETRAIN, "--config", str(config),
         f"output_dir={run_dir}", "loss.pairdist.weight=0.5", "loss.pairdist.margin=0.1",
         "loss.weighting=dwa", "loss.balance_window=1"])
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "train"]
    assert all("pairdist" in r and "pairdist_mean_distance" in r and "weight_pairdist" in r for r in train)
    assert train[-1]["weight_pairdist"] != 0.5  # DWA moved it after two windows
    evaluated = json.loads((run_dir / "eval.json").read_text())
    assert "pairdist" in evaluated["loss"]
    saved = (run_dir / "model" / "config.yaml").read_text()
    assert "pairdist:" in saved and "margin: 0.1" in saved


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dwa", "gradnorm"])
def test_balanced_weights_resume_exactly(shards, tmp_path, mode):
    """6 steps straight vs 3 steps + resume: the losses and balancing weights logged at
    steps 4-6 agree. (Until the loader had an RNG of its own, starting the resumed epoch
    drew from the global RNG and shifted dropout and ITM sampling: losses differed.)
    SigLIP rides along: its bias starts at the batch's prior log-odds, and a resume keeps
    the trained bias instead of starting it again."""
    config = write_config(tmp_path / "cfg.yaml", shards["train"], "", steps=6, checkpoint_every=3,
                          precision="fp32")
    common = [f"loss.weighting={mode}", "loss.balance_window=1", "loss.gradnorm_lr=0.2", "loss.siglip=0.5"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run([sys.executable, PRETRAIN, "--config", str(config), f"output_dir={full}", *common])
    run([sys.executable, PRETRAIN, "--config", str(config), f"output_dir={resumed}", *common,
         f"train.resume={full}/checkpoints/step-00000003"])

    def weights(run_dir: Path) -> dict[int, dict[str, float]]:
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: {k: v for k, v in r.items() if k.startswith("weight_") or k == "siglip_bias"}
                for r in lines if r["kind"] == "train"}

    straight, again = weights(full), weights(resumed)
    # batch 4 on one rank: -log 3, moved by about the LR (1e-3) a step
    assert straight[1]["siglip_bias"] == pytest.approx(-math.log(3), abs=0.01)
    assert straight[6] and any(abs(v - 1.0) > 1e-3 for v in straight[6].values())  # the rule acted
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7), step


def test_gradnorm_under_zero3_is_a_clear_error(shards, tmp_path, capsys):
    sys.path.insert(0, str(REPO / "pipelines"))
    try:
        import pretrain
    finally:
        sys.path.pop(0)
    config = write_config(tmp_path / "cfg.yaml", shards["train"], "")
    code = pretrain.main(["--config", str(config), f"output_dir={tmp_path / 'run'}",
                          "loss.weighting=gradnorm", "train.zero_stage=3"])
    err = capsys.readouterr().err
    assert code == 2 and "gradnorm does not work with ZeRO-3" in err and "Traceback" not in err


def test_hard_negative_captions_join_itc_filip_and_itm_with_one_text_tower_pass(tmp_path):
    from test_model import tiny_tokenizer

    torch.manual_seed(0)
    cfg = tiny_cfg(lm=0.0)
    cfg.loss.text_negatives.fraction = 1.0
    model = build_model(cfg)
    model.tokenizer = tiny_tokenizer(tmp_path)
    batch = tiny_batch(b=4)
    batch["text"] = ["a red square above a blue cat", "a blue square", "a red cat on a blue square", "cat"]
    encodes, itm_rows = [], []
    real_encode = model.text.encode
    model.text.encode = lambda *a, **k: encodes.append(a[0].shape[0]) or real_encode(*a, **k)
    model.itm_head.register_forward_hook(lambda _m, inp, _o: itm_rows.append(inp[0].shape[0]))
    model.set_training_progress(3, 0.1)
    out = model(batch)
    # Captions 0 and 2 have two phrases, 1 two words, 3 one word: negatives for 0, 1, 2.
    assert encodes == [4, 3] and itm_rows == [3 * 4 + 3]
    assert torch.isfinite(out["loss"]) and out["itm_acc"] >= 0
    out["loss"].backward()
    model.eval()  # no negatives in evaluation: one text pass
    encodes.clear()
    model(batch)
    assert encodes == [4]
    cfg.loss.text_negatives.fraction = 0.0
    plain = build_model(cfg)
    plain_encode = plain.text.encode
    plain.text.encode = lambda *a, **k: encodes.append(("plain", a[0].shape[0])) or plain_encode(*a, **k)
    del batch["text"]  # off means the captions' text is not even needed
    encodes.clear()
    plain(batch)
    assert encodes == [("plain", 4)]


def test_unknown_hard_negative_kind_is_a_config_error():
    cfg = tiny_cfg()
    cfg.loss.text_negatives.kinds = ["swap_objects", "negate"]
    with pytest.raises(Exception, match="loss.text_negatives.kinds"):
        build_model(cfg)


@pytest.mark.parametrize("name", ["itm", "lm"])
def test_without_tower_gradients_an_objective_trains_only_its_own_layers(name):
    """loss.<itm|lm>.tower_gradients: false: the same loss, and its gradient reaches the
    fusion layers / decoder but no parameter of the towers."""
    def grads(tower_gradients: bool) -> tuple[float, set[str]]:
        torch.manual_seed(0)
        cfg = tiny_cfg(**{"itc": 0.0, "filip": 0.0, "itm": 0.0, "lm": 0.0, name: 1.0})
        cfg.model.decoder.share_weights = False
        cfg.loss.objectives[name].tower_gradients = tower_gradients
        model = build_model(cfg)
        out = model(tiny_batch(b=4))
        out[name].backward()
        return out[name].item(), {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    loss, trained = grads(False)
    full_loss, full = grads(True)
    assert loss == pytest.approx(full_loss)
    towers = ("vision.", "text.layers.", "image_proj", "text_proj")
    assert any(n.startswith(towers) for n in full)
    assert trained and not any(n.startswith(towers) for n in trained), sorted(trained)
    own = ("text.fusion.", "itm_head.") if name == "itm" else ("decoder.",)
    assert all(n.startswith(own) for n in trained), sorted(trained)


def test_a_decoder_sharing_the_text_layers_cannot_keep_the_captioning_loss_out_of_them():
    from vlp.config import ConfigError
    cfg = tiny_cfg()
    cfg.loss.lm.tower_gradients = False
    with pytest.raises(ConfigError, match="model.decoder.share_weights: false"):
        build_model(cfg)

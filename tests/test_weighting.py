"""Loss balancing (fixed, uncertainty, DWA, GradNorm) and the objective curriculum, each
against numbers worked out by hand, and their state surviving a checkpoint round trip."""
from __future__ import annotations

import math

import pytest
import torch

from vlp.config import ConfigError, LossConfig, load_config
from vlp.losses import LossWeighting


def weighting(mode: str, weights: dict[str, float], **shared) -> LossWeighting:
    cfg = load_config(overrides=[f"loss.weighting={mode}", *(f"loss.{k}={v}" for k, v in shared.items()),
                                 *(f"loss.{name}={w}" for name, w in weights.items())])
    return LossWeighting({name: cfg.loss.objectives[name] for name in weights}, cfg.loss)


def step(module: LossWeighting, values: dict[str, float], norms=None, progress: float = 0.0):
    losses = {name: torch.tensor(v) for name, v in values.items()}
    grad_norms = (lambda _losses: torch.tensor(norms)) if norms is not None else None
    return module(losses, module.multipliers(progress), training=True, shared_grad_norms=grad_norms)


def test_fixed_and_uncertainty_follow_their_definitions():
    fixed, metrics = step(weighting("fixed", {"itc": 1.0, "lm": 0.5}), {"itc": 2.0, "lm": 4.0})
    assert fixed.item() == pytest.approx(4.0) and metrics["weight_lm"].item() == 0.5
    module = weighting("uncertainty", {"itc": 1.0, "lm": 0.5, "filip": 0.0})
    assert set(module.log_vars) == {"itc", "lm"}
    with torch.no_grad():
        module.log_vars["itc"].fill_(0.3)
        module.log_vars["lm"].fill_(-0.2)
    total, metrics = step(module, {"itc": 2.0, "lm": 4.0})
    assert total.item() == pytest.approx((math.exp(-0.3) * 2.0 + 0.3) + 0.5 * (math.exp(0.2) * 4.0 - 0.2), abs=1e-5)
    assert metrics["weight_lm"].item() == pytest.approx(0.5 * math.exp(0.2), abs=1e-5)
    with pytest.raises(ConfigError, match="weighting"):
        LossWeighting({}, LossConfig(weighting="learned"))


def test_dwa_weights_follow_the_ratio_of_the_last_two_windows():
    """Window 2, T 2: itc's window means 4 then 2 (ratio 0.5), lm's 2 then 2 (ratio 1); from
    the third window w = 2·softmax([0.5, 1] / 2). The configured weights still multiply."""
    module = weighting("dwa", {"itc": 1.0, "lm": 0.5}, balance_window=2, dwa_temperature=2.0)
    totals = [step(module, values)[0].item() for values in
              ({"itc": 4.0, "lm": 2.0}, {"itc": 4.0, "lm": 2.0}, {"itc": 2.0, "lm": 2.0}, {"itc": 2.0, "lm": 2.0})]
    assert totals == pytest.approx([5.0, 5.0, 3.0, 3.0])  # w = 1 for the first two windows
    e = [math.exp(0.25), math.exp(0.5)]
    w = [2 * e[0] / sum(e), 2 * e[1] / sum(e)]
    total, metrics = step(module, {"itc": 1.0, "lm": 1.0})
    assert total.item() == pytest.approx(w[0] * 1.0 + 0.5 * w[1] * 1.0, rel=1e-6)
    assert metrics["weight_itc"].item() == pytest.approx(w[0], rel=1e-6)


def test_gradnorm_moves_weight_towards_the_objective_with_the_smaller_gradient():
    """First update: every L/L(0) = 1, so the target is mean(G) = 2 for norms [3, 1];
    ∂L_grad/∂w = sign(G - 2)·‖∇L‖ = [+3, -1]; Adam's first step is lr·sign: w = [1 - lr, 1 + lr].
    Second: L/L(0) = [0.5, 1] → r = [2/3, 4/3]; G = w·[2, 2]; target = mean(G)·r^α."""
    lr, alpha = 0.025, 1.5
    module = weighting("gradnorm", {"itc": 1.0, "lm": 1.0}, gradnorm_lr=lr, gradnorm_alpha=alpha)
    step(module, {"itc": 4.0, "lm": 2.0}, norms=[3.0, 1.0])
    w = torch.tensor([1 - lr, 1 + lr], dtype=torch.float64)
    torch.testing.assert_close(module.state["balance"], w)
    total, metrics = step(module, {"itc": 2.0, "lm": 2.0}, norms=[2.0, 2.0])
    assert total.item() == pytest.approx(float(w[0] * 2 + w[1] * 2), rel=1e-6)  # weights before this update
    g = w * 2.0
    r = torch.tensor([0.5, 1.0], dtype=torch.float64)
    r = r / r.mean()
    grad = torch.sign(g - g.mean() * r ** alpha) * 2.0
    m = 0.9 * 0.1 * torch.tensor([3.0, -1.0], dtype=torch.float64) + 0.1 * grad
    v = 0.999 * 0.001 * torch.tensor([9.0, 1.0], dtype=torch.float64) + 0.001 * grad ** 2
    new = w - lr * (m / (1 - 0.9 ** 2)) / ((v / (1 - 0.999 ** 2)).sqrt() + 1e-8)
    torch.testing.assert_close(module.state["balance"], new * 2 / new.sum())
    assert module.state["balance"].sum().item() == pytest.approx(2.0)


def test_curriculum_starts_and_ramps_an_objective_and_skips_it_before():
    cfg = load_config(overrides=["loss.itm.start=0.5", "loss.itm.ramp=0.25", "loss.lm=2"])
    module = LossWeighting(cfg.loss.objectives, cfg.loss)
    assert module.multipliers(0.2)["itm"] == 0.0 and module.multipliers(0.2)["lm"] == 2.0
    assert module.multipliers(0.625)["itm"] == pytest.approx(0.5)
    assert module.multipliers(0.9)["itm"] == 1.0
    assert "siglip" not in module.multipliers(0.9)  # weight 0: never part of the sum


ITC_ALONE = ["loss.filip=0", "loss.itm=0", "loss.lm=0"]


def test_an_objective_leaves_at_its_end_and_evaluation_scores_every_objective():
    cfg = load_config(overrides=[*ITC_ALONE, "loss.itc.end=0.8", "loss.itm=1", "loss.itm.start=0.8"])
    module = LossWeighting(cfg.loss.objectives, cfg.loss)
    assert module.multipliers(0.79) == {"itc": 1.0, "itm": 0.0}
    assert module.multipliers(0.8) == {"itc": 0.0, "itm": 1.0}
    assert module.multipliers(None) == {"itc": 1.0, "itm": 1.0}


@pytest.mark.parametrize("overrides, message", [
    (["loss.itc.end=0.8"], "no objective runs from 0.8 to 1 of the run"),
    (["loss.itc.end=0.5", "loss.itm=1", "loss.itm.start=0.6"], "no objective runs from 0.5 to 0.6"),
    (["loss.itm=1", "loss.itm.start=0.9", "loss.itm.end=0.9"], "loss.itm: need 0 <= start < end <= 1"),
    (["loss.itc.ramp=-0.1"], "loss.itc: need 0 <= start < end <= 1 and ramp >= 0"),
])
def test_a_schedule_that_leaves_part_of_the_run_without_an_objective_is_refused(overrides, message):
    cfg = load_config(overrides=ITC_ALONE + overrides)
    with pytest.raises(ConfigError, match=message):
        LossWeighting(cfg.loss.objectives, cfg.loss)


@pytest.mark.parametrize("mode", ["dwa", "gradnorm"])
def test_balancing_state_survives_a_state_dict_round_trip_and_stays_float32_in_bf16(mode):
    module = weighting(mode, {"itc": 1.0, "lm": 1.0}, balance_window=1)
    sequence = [({"itc": 4.0 - i * 0.3, "lm": 2.0 - i * 0.1}, [3.0 - i * 0.2, 1.0]) for i in range(6)]
    for values, norms in sequence[:3]:
        step(module, values, norms)
    copy = weighting(mode, {"itc": 1.0, "lm": 1.0}, balance_window=1).to(torch.bfloat16)
    copy.load_state_dict(module.state_dict())
    for values, norms in sequence[3:]:
        a, b = step(module, values, norms)[0], step(copy, values, norms)[0]
        assert a.item() == b.item()
    assert all(value.dtype == torch.float64 for value in copy.state.values())

"""DeepSpeed engine setup: config generated from our TrainConfig, AdamW param groups,
warmup + cosine schedule. The only module that calls `deepspeed.initialize`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vlp.config import ConfigError, TrainConfig
from vlp.train.budget import Budget, schedule_factor

# Name fragments of parameters that must not be decayed although they are matrices (every
# parameter with fewer than 2 dims is never decayed: norms, biases, temperatures, log-vars).
NO_DECAY_NAMES = ("pos_embed", "cls_token", "position_embeddings", "token_type_embeddings")
# Parameters of the objectives' own layers, not of the towers (a second stage trains only these).
OWN_LAYERS = ("text.fusion.", "itm_head.", "decoder.")


def deepspeed_config(train: TrainConfig, micro_batch: int, world_size: int,
                     precision: str) -> dict[str, Any]:
    """The DeepSpeed JSON for this run. A user JSON (`train.deepspeed_config`) is merged on
    top, so any key it names wins; batch sizes must then agree with `data.batch_size`."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": micro_batch * train.grad_accum * world_size,
        # DeepSpeed does not clip unless told to.
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        # loss_scale 0 = dynamic loss scaling.
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        # Our torch AdamW under ZeRO: DeepSpeed only tests its own optimizers.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    user = user_deepspeed_json(train)
    if user:
        path = train.deepspeed_config
        config = _merge(config, user)
        if "train_batch_size" not in user:
            config["train_batch_size"] = (config["train_micro_batch_size_per_gpu"]
                                          * config["gradient_accumulation_steps"] * world_size)
        if config["train_micro_batch_size_per_gpu"] != micro_batch:
            raise ConfigError(
                f"{path}: train_micro_batch_size_per_gpu={config['train_micro_batch_size_per_gpu']} "
                f"disagrees with data.batch_size={micro_batch}; set data.batch_size to match")
        if config["bf16"].get("enabled") and config["fp16"].get("enabled"):
            raise ConfigError(f"{path}: bf16 and fp16 cannot both be enabled")
    return config


def user_deepspeed_json(train: TrainConfig) -> dict[str, Any]:
    """The user's DeepSpeed JSON (`train.deepspeed_config`), or {}."""
    if not train.deepspeed_config:
        return {}
    path = Path(train.deepspeed_config)
    if not path.is_file():
        raise ConfigError(f"train.deepspeed_config: file not found: {path}")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"train.deepspeed_config: {path} is not valid JSON: {err}") from err


def zero_stage(train: TrainConfig) -> int:
    """The ZeRO stage the run will use (a user JSON's wins), known before anything starts."""
    return user_deepspeed_json(train).get("zero_optimization", {}).get("stage", train.zero_stage)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def config_precision(ds_config: dict) -> str:
    if ds_config.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds_config.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float = 1.0,
                 text_lr_scale: float = 1.0, split_towers: bool = False) -> list[dict[str, Any]]:
    """AdamW groups: decay for weight matrices; none for norms, biases, temperatures,
    embeddings of position/type and every other 1-d parameter. The pretrained text tower
    (`text.*`) gets `lr * text_lr_scale`. With `split_towers` (a run with a second stage)
    the objectives' own layers (fusion, ITM head, decoder) get groups apart from the
    towers' (`towers`: false), so the towers alone can be stopped. Each group carries its
    parameter names, so checkpoints can be mapped back to names; empty groups are dropped."""
    groups: dict[tuple[bool, bool, bool], tuple[list, list]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or any(fragment in name for fragment in NO_DECAY_NAMES)
        key = (skip, name.startswith("text."), not (split_towers and name.startswith(OWN_LAYERS)))
        names, params = groups.setdefault(key, ([], []))
        names.append(name)
        params.append(param)
    return [{"params": params, "names": names, "weight_decay": 0.0 if skip else weight_decay,
             "lr": lr * (text_lr_scale if is_text else 1.0), "towers": towers}
            for (skip, is_text, towers), (names, params) in sorted(groups.items())]


def second_stage_start(model: torch.nn.Module) -> float | None:
    """`VLPModel.second_stage_start` (None for any other module: no second stage)."""
    return getattr(model, "second_stage_start", lambda: None)()


def build_optimizer(model: torch.nn.Module, train: TrainConfig, budget: Budget):
    """Torch AdamW (never DeepSpeed's fused/CPU Adam, whose JIT build takes a minute) and
    its LambdaLR warmup-cosine schedule over the run's progress (`vlp.train.budget`),
    stepped once per optimizer step.

    A run with a second stage (`VLPModel.second_stage_start`) schedules two sets of groups:
    the towers follow the run's schedule and get a learning rate of 0 wherever no objective
    that trains them runs (AdamW's momentum and weight decay would otherwise keep moving
    them: DeepSpeed hands them zero gradients); the objectives' own layers (fusion, ITM
    head, decoder), new weights that join late, get a warmup-cosine of their own over the
    stretch from their start to the end of the run (0 before it), as a separate fine-tuning
    stage would give them, instead of the tail of the towers' decay."""
    towers_learn = getattr(model, "towers_learn", lambda progress: True)
    stage = second_stage_start(model)
    groups = param_groups(model, train.weight_decay, train.lr, train.text_lr_scale, split_towers=stage is not None)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k not in ("names", "towers")} for g in groups],
                                  lr=train.lr, betas=tuple(train.betas), eps=train.eps)
    warmup = train.warmup_fraction or train.warmup_steps / train.steps

    def factor(step: int, towers: bool) -> float:
        progress = budget.progress(step)
        if stage is None or (towers and towers_learn(progress)):
            return schedule_factor(progress, warmup, train.min_lr_ratio, first_step=1 / train.steps)
        if towers or progress < stage:
            return 0.0
        length = 1.0 - stage
        return schedule_factor((progress - stage) / length, warmup, train.min_lr_ratio,
                               first_step=1 / (train.steps * length))

    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [lambda step, towers=g["towers"]: factor(step, towers) for g in groups])
    return optimizer, schedule, [g["names"] for g in groups]


def build_engine(model: torch.nn.Module, train: TrainConfig, ds_config: dict, budget: Budget):
    """deepspeed.initialize with our optimizer and schedule unless the user JSON brings its
    own `optimizer` / `scheduler` sections. Returns (engine, param names per group)."""
    import deepspeed

    if second_stage_start(model) is not None and ("optimizer" in ds_config or "scheduler" in ds_config):
        raise ConfigError("a second stage (an objective's loss.<name>.end before another's start, with "
                          "tower_gradients: false) stops the towers through vlp's own optimizer and "
                          "schedule; remove the optimizer/scheduler sections from train.deepspeed_config")
    optimizer, schedule, names = build_optimizer(model, train, budget)
    kwargs: dict[str, Any] = {"model": model, "config": ds_config}
    if "optimizer" in ds_config:
        kwargs["model_parameters"] = [p for p in model.parameters() if p.requires_grad]
        names = None
    else:
        kwargs["optimizer"] = optimizer
    if "scheduler" not in ds_config and "optimizer" not in ds_config:
        kwargs["lr_scheduler"] = schedule
    engine, _, _, _ = deepspeed.initialize(**kwargs)
    return engine, names

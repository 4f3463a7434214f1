"""Captioning decoder (BLIP): causal text layers with cross-attention to image tokens,
`[DEC]` as bos, and an LM head tied to the word embeddings."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

from vlp.model.text import TextTower, causal_mask, init_like_bert, run_layers


class CaptionDecoder(nn.Module):
    def __init__(self, text: TextTower, image_width: int, share_weights: bool):
        super().__init__()
        self.layers = text.decoder_layers(share_weights, image_width)
        self.embeddings = text.embeddings if share_weights else copy.deepcopy(text.embeddings)
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
        return run_layers(self.layers, hidden, causal_mask(attention_mask),
                          image_states.to(hidden.dtype), self.grad_checkpointing)

"""The shared features of one training batch, each computed once, when an objective first
asks for it. Objectives read these instead of calling the towers, so ITC, FILIP, ITM and
captioning share one pass of each tower."""
from __future__ import annotations

import contextlib
from functools import cached_property

import torch

from vlp.padding import trim_padding


class Features:
    def __init__(self, model, batch: dict, towers_learn: bool = True) -> None:
        self.model, self.batch = model, batch
        # Columns that are padding in every row only cost time.
        self.input_ids, self.attention_mask = trim_padding(batch["input_ids"], batch["attention_mask"])
        self.image_id = batch["image_id"]
        # False: no objective of this step trains the towers, so their states need no graph.
        self.towers_learn = towers_learn

    def _towers(self):
        return contextlib.nullcontext() if self.towers_learn else torch.no_grad()

    @cached_property
    def image_states(self) -> torch.Tensor:
        """ViT token states `[B, 1+N, vision_width]`."""
        with self._towers():
            return self.model.encode_image_states(self.batch["image"])

    @cached_property
    def text_states(self) -> torch.Tensor:
        """Text-only states `[B, L, text_width]` (below the fusion layers)."""
        with self._towers():
            return self.model.encode_text_states(self.input_ids, self.attention_mask)

    @cached_property
    def image_emb(self) -> torch.Tensor:
        return self.model.encode_image(image_states=self.image_states)

    @cached_property
    def text_emb(self) -> torch.Tensor:
        return self.model.encode_text(attention_mask=self.attention_mask, text_states=self.text_states)

    @cached_property
    def image_tokens(self) -> torch.Tensor:
        return self.model.encode_image_tokens(image_states=self.image_states)

    @cached_property
    def text_tokens(self) -> torch.Tensor:
        return self.model.encode_text_tokens(attention_mask=self.attention_mask, text_states=self.text_states)

    # ------------------------------------------------------------------ hard negatives
    # Composition-aware negative captions (loss.text_negatives): None when off, in
    # evaluation, or when no caption of the batch yields one.
    @cached_property
    def negatives(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(owner [n]: the batch row each was made from, input_ids [n, L], attention_mask)."""
        return self.model.text_negatives(self.batch)

    @cached_property
    def negative_text_states(self) -> torch.Tensor | None:
        if self.negatives is None:
            return None
        _, ids, mask = self.negatives
        if ids.shape[0] == 0:  # none on this rank; the objectives' gathers still run
            reference = self.text_states
            return reference.new_zeros(0, 1, reference.shape[-1])
        with self._towers():
            return self.model.encode_text_states(ids, mask)

    @property
    def negative_mask(self) -> torch.Tensor | None:
        return None if self.negatives is None else self.negatives[2]

    @property
    def negative_owner(self) -> torch.Tensor | None:
        return None if self.negatives is None else self.negatives[0]

    @cached_property
    def negative_text_emb(self) -> torch.Tensor | None:
        if self.negatives is None:
            return None
        return self.model.encode_text(attention_mask=self.negative_mask, text_states=self.negative_text_states)

    @cached_property
    def negative_text_tokens(self) -> torch.Tensor | None:
        if self.negatives is None:
            return None
        return self.model.encode_text_tokens(attention_mask=self.negative_mask,
                                             text_states=self.negative_text_states)


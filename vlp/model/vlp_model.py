"""The VLP model: ViT ⊕ BERT [+ fusion layers] [+ captioning decoder], all four objectives.

`model(batch)` returns a dict of named losses and metrics; an objective whose weight is 0 is
never computed. The scoring API (encode_*, filip_scores, itm_scores, generate) is what the
retrieval, zero-shot and captioning rooms use.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlp.config import ConfigError, DataConfig, LossConfig, ModelConfig
from vlp.data.images import Normalize
from vlp.losses import (IGNORE, ContrastiveLoss, FilipLoss, LossWeighting, caption_loss, itm_loss,
                        lm_targets, sample_hard_negatives)
from vlp.losses.distributed import gather_no_grad, gather_with_grad, max_over_ranks, world
from vlp.losses.filip import filip_similarity
from vlp.model.decoder import CaptionDecoder
from vlp.model.generate import generate_ids
from vlp.model.text import TextTower
from vlp.model.vision import VisionTower

OBJECTIVES = ("itc", "filip", "itm", "lm")


def check_model_config(model_cfg: ModelConfig, loss_cfg: LossConfig) -> None:
    for name in OBJECTIVES:
        if getattr(loss_cfg, name) < 0:
            raise ConfigError(f"config key 'loss.{name}' must be >= 0")
    if loss_cfg.itm > 0 and model_cfg.text.fusion_layers == 0:
        raise ConfigError("loss.itm > 0 needs fusion layers: set model.text.fusion_layers >= 1 "
                          "or loss.itm: 0")
    if loss_cfg.lm > 0 and not model_cfg.decoder.enabled:
        raise ConfigError("loss.lm > 0 needs the decoder: set model.decoder.enabled: true or loss.lm: 0")
    if not 0 < loss_cfg.lm_batch_fraction <= 1:
        raise ConfigError(f"config key 'loss.lm_batch_fraction' must be in (0, 1], "
                          f"got {loss_cfg.lm_batch_fraction}")
    if not any(getattr(loss_cfg, name) > 0 for name in OBJECTIVES):
        raise ConfigError("every loss weight is 0: enable at least one of loss.itc/filip/itm/lm")


def trim_padding(tokens: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drops the token positions (dim 1 of `tokens`: ids or states) that are padding in every
    row: captions come padded to data.max_len, and those positions only cost time."""
    length = max(int(attention_mask.sum(1).max()), 1)
    return tokens[:, :length], attention_mask[:, :length]


class VLPModel(nn.Module):
    def __init__(self, model_cfg: ModelConfig, loss_cfg: LossConfig, data_cfg: DataConfig | None = None):
        super().__init__()
        check_model_config(model_cfg, loss_cfg)
        self.weights = {name: float(getattr(loss_cfg, name)) for name in OBJECTIVES}
        # The data config's normalization constants: uint8 batches are normalized on the device.
        self.vision = VisionTower(model_cfg.vision, Normalize(data_cfg) if data_cfg else None)
        self.text = TextTower(model_cfg.text, self.vision.width)
        self.image_proj = nn.Linear(self.vision.width, model_cfg.embed_dim)
        self.text_proj = nn.Linear(self.text.width, model_cfg.embed_dim)
        self.text_pooling = model_cfg.text.pooling
        self.itc = ContrastiveLoss(loss_cfg.init_temperature, loss_cfg.max_logit_scale)
        # Parts of objectives that are off are not built: no dead parameters to train.
        if self.weights["filip"] > 0:
            self.image_token_proj = nn.Linear(self.vision.width, model_cfg.filip_dim)
            self.text_token_proj = nn.Linear(self.text.width, model_cfg.filip_dim)
            self.filip = FilipLoss(loss_cfg.init_temperature, loss_cfg.max_logit_scale,
                                   model_cfg.filip_token_fraction, loss_cfg.filip_chunk,
                                   loss_cfg.filip_precision)
        self.itm_head = nn.Linear(self.text.width, 2) if len(self.text.fusion) else None
        self.itm_global_negatives = loss_cfg.itm_global_negatives
        self.itm_hard_negatives_warmup = loss_cfg.itm_hard_negatives_warmup
        self.itm_hardness = 1.0  # set per step by the trainer (set_training_step)
        self.decoder = (CaptionDecoder(self.text, self.vision.width, model_cfg.decoder.share_weights)
                        if model_cfg.decoder.enabled else None)
        self.max_new_tokens = model_cfg.decoder.max_new_tokens
        self.label_smoothing = loss_cfg.label_smoothing
        self.lm_batch_fraction = loss_cfg.lm_batch_fraction
        self.weighting = LossWeighting(self.weights, loss_cfg.weighting)
        self.tokenizer = None  # set by build_model / load_model_dir when one is available
        self.set_grad_checkpointing(model_cfg.grad_checkpointing)

    # ------------------------------------------------------------------ utilities
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vision.set_grad_checkpointing(enable)
        self.text.grad_checkpointing = enable
        if self.decoder is not None:
            self.decoder.grad_checkpointing = enable

    def set_training_step(self, step: int) -> None:
        """The trainer calls this before each step: ITM negative hardness follows the step."""
        warmup = self.itm_hard_negatives_warmup
        self.itm_hardness = 1.0 if warmup <= 0 else min(1.0, step / warmup)

    @property
    def has_filip(self) -> bool:
        return hasattr(self, "filip")

    @property
    def has_itm(self) -> bool:
        return self.itm_head is not None

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    @property
    def logit_scale(self) -> torch.Tensor:
        """The ITC scale s (not its log), as used in the loss."""
        return self.itc.scale().detach()

    @property
    def filip_logit_scale(self) -> torch.Tensor:
        return self._filip().scale().detach()

    def _filip(self) -> FilipLoss:
        if not self.has_filip:
            raise ValueError("this model has no FILIP heads (it was built with loss.filip: 0)")
        return self.filip

    # ------------------------------------------------------------------ scoring API
    def encode_image_states(self, images: torch.Tensor) -> torch.Tensor:
        """ViT token states `[B, 1+N, vision_width]`: what the fusion layers attend to."""
        return self.vision(images)

    def encode_image(self, images: torch.Tensor | None,
                     image_states: torch.Tensor | None = None) -> torch.Tensor:
        if image_states is None:
            image_states = self.vision(images)
        return F.normalize(self.image_proj(image_states[:, 0]).float(), dim=-1)

    def encode_text_states(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
                           inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Text-only hidden states `[B, L, text_width]` (below the fusion layers). Callers that
        need several text scores (ITC, FILIP, ITM) compute these once and pass them on."""
        return self.text.encode(input_ids, attention_mask, inputs_embeds)

    def embed_words(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The text tower's word embeddings `[B, L, text_width]`, the input space of
        `inputs_embeds` (CoOp learns context vectors there)."""
        return self.text.embeddings.word_embeddings(input_ids)

    def encode_text(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
                    text_states: torch.Tensor | None = None,
                    inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if text_states is None:
            text_states = self.encode_text_states(input_ids, attention_mask, inputs_embeds)
        return self._text_embedding(text_states, attention_mask)

    def _text_embedding(self, text_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.text_pooling == "mean":
            weights = attention_mask[:, :text_states.shape[1], None].to(text_states.dtype)
            pooled = (text_states * weights).sum(1) / weights.sum(1).clamp(min=1)
        else:
            pooled = text_states[:, 0]
        return F.normalize(self.text_proj(pooled).float(), dim=-1)

    def encode_image_tokens(self, images: torch.Tensor | None,
                            image_states: torch.Tensor | None = None) -> torch.Tensor:
        """FILIP patch tokens `[B, N, filip_dim]` (CLS excluded), normalized per token."""
        self._filip()
        if image_states is None:
            image_states = self.vision(images)
        return F.normalize(self.image_token_proj(image_states[:, 1:]).float(), dim=-1)

    def encode_text_tokens(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
                           text_states: torch.Tensor | None = None) -> torch.Tensor:
        """FILIP text tokens `[B, L, filip_dim]`; the real ones are where attention_mask is 1."""
        self._filip()
        if text_states is None:
            text_states = self.encode_text_states(input_ids, attention_mask)
        return F.normalize(self.text_token_proj(text_states).float(), dim=-1)

    def filip_scores(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                     text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(i2t, t2i) token-wise similarities, both `[B_img, B_txt]` (unscaled)."""
        filip = self._filip()
        return filip_similarity(image_tokens, text_tokens, text_mask, filip.chunk, filip.dtype)

    def itm_scores(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
                   images: torch.Tensor | None = None,
                   image_states: torch.Tensor | None = None,
                   text_states: torch.Tensor | None = None) -> torch.Tensor:
        """Match probability `[B]` of aligned (text i, image i) pairs. Precomputed
        `image_states` / `text_states` skip the towers (rerank many pairs, encode once)."""
        if self.itm_head is None:
            raise ValueError("this model has no ITM head (model.text.fusion_layers: 0)")
        if image_states is None:
            if images is None:
                raise ValueError("itm_scores needs images or image_states")
            image_states = self.vision(images)
        if text_states is None:
            text_states = self.encode_text_states(input_ids, attention_mask)
        fused = self.text.fuse(text_states, attention_mask, image_states)
        return self.itm_head(fused[:, 0]).float().softmax(-1)[:, 1]

    def generate_ids(self, images: torch.Tensor | None, method: str = "beam",
                     max_new_tokens: int | None = None, image_states: torch.Tensor | None = None,
                     **options) -> torch.Tensor:
        """Caption token ids `[B, T]` (no bos; [SEP] then pad at the end). Precomputed
        `image_states` skip the vision tower (several captions per image, then ITM)."""
        if self.decoder is None:
            raise ValueError("this model has no captioning decoder (model.decoder.enabled: false)")
        sep_id, pad_id = self._special_ids()
        was_training = self.training
        self.eval()  # no dropout while decoding, also when called mid-training
        try:
            with torch.no_grad():
                if image_states is None:
                    image_states = self.vision(images)
                return generate_ids(self.decoder, image_states, sep_id, pad_id, method,
                                    self.max_new_tokens if max_new_tokens is None else max_new_tokens,
                                    **options)
        finally:
            self.train(was_training)

    def generate(self, images: torch.Tensor | None, method: str = "beam", max_new_tokens: int | None = None,
                 tokenizer=None, **options) -> list[str]:
        """Captions for a batch of transformed images. `method`: greedy | beam | nucleus;
        options: num_beams (3), top_p (0.9), temperature (1.0), generator (a torch.Generator
        for reproducible nucleus sampling), cache (True: the decoder's key/value cache)."""
        tokenizer = tokenizer or self.tokenizer
        if tokenizer is None:
            raise ValueError("generate needs a tokenizer (pass tokenizer= or use generate_ids)")
        ids = self.generate_ids(images, method, max_new_tokens, **options)
        return tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)

    def _special_ids(self) -> tuple[int, int]:
        pad_id = self.text.config.pad_token_id or 0
        if self.tokenizer is not None:
            return self.tokenizer.sep_token_id, self.tokenizer.pad_token_id
        return 102, pad_id  # BERT's [SEP] when no tokenizer is attached

    # ------------------------------------------------------------------ training
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        w = self.weights
        input_ids, attention_mask = trim_padding(batch["input_ids"], batch["attention_mask"])
        image_states = self.vision(batch["image"])
        text_states = self.text.encode(input_ids, attention_mask) if w["itc"] or w["filip"] or w["itm"] else None
        losses, metrics = {}, {}

        def record(name: str, result: dict) -> None:
            losses[name] = result.pop("loss")
            metrics.update({f"{name}_{key}": value for key, value in result.items()})

        image_emb = text_emb = None
        if w["itc"] or w["itm"]:
            with torch.set_grad_enabled(torch.is_grad_enabled() and w["itc"] > 0):
                image_emb = self.encode_image(None, image_states=image_states)
                text_emb = self.encode_text(None, attention_mask, text_states=text_states)
        if w["itc"]:
            record("itc", self.itc(image_emb, text_emb))
        if w["filip"]:
            image_tokens = self.encode_image_tokens(None, image_states=image_states)
            text_tokens = self.encode_text_tokens(None, attention_mask, text_states=text_states)
            record("filip", self.filip(image_tokens, text_tokens, attention_mask))
        if w["itm"]:
            record("itm", self._itm(image_states, text_states, attention_mask,
                                    image_emb.detach(), text_emb.detach(), batch["image_id"]))
        if w["lm"]:
            # Training may caption a part of the batch; the val loss always covers all of it.
            fraction = self.lm_batch_fraction if self.training else 1.0
            n = max(1, math.ceil(fraction * input_ids.shape[0]))
            input_ids, attention_mask = trim_padding(input_ids[:n], attention_mask[:n])
            hidden = self.decoder.hidden(input_ids, attention_mask, image_states[:n])
            targets = lm_targets(input_ids, attention_mask)
            scored = targets != IGNORE  # the vocab projection only where a token is predicted
            record("lm", caption_loss(self.decoder.logits(hidden[scored]), targets[scored],
                                      self.label_smoothing))
        total, weight_metrics = self.weighting(losses)
        return {"loss": total, **losses, **metrics, **weight_metrics}

    def _itm(self, image_states, text_states, attention_mask, image_emb, text_emb, image_id):
        """Positives, plus one hard negative text per image and one hard negative image per
        text (from the global batch when gathering is on): 3b pairs through the fusion layers."""
        b = image_states.shape[0]
        use_global = self.itm_global_negatives and world()[1] > 1
        if use_global:
            length = max_over_ranks(text_states.shape[1])
            text_states = F.pad(text_states, (0, 0, 0, length - text_states.shape[1]))
            attention_mask = F.pad(attention_mask, (0, length - attention_mask.shape[1]))
            all_images, all_texts = gather_with_grad(image_states), gather_with_grad(text_states)
            all_mask, all_ids = gather_no_grad(attention_mask), gather_no_grad(image_id)
            all_image_emb, all_text_emb = gather_no_grad(image_emb), gather_no_grad(text_emb)
        else:
            all_images, all_texts, all_mask, all_ids = image_states, text_states, attention_mask, image_id
            all_image_emb, all_text_emb = image_emb, text_emb
        scale = self.itc.scale().detach() * self.itm_hardness
        same = image_id[:, None] == all_ids[None, :]  # [b, B]: the positive and duplicates
        neg_text, text_ok = sample_hard_negatives(scale * image_emb @ all_text_emb.t(), same)
        neg_image, image_ok = sample_hard_negatives(scale * text_emb @ all_image_emb.t(), same)
        texts = torch.cat([text_states, all_texts[neg_text], text_states])
        masks = torch.cat([attention_mask, all_mask[neg_text], attention_mask])
        images = torch.cat([image_states, image_states, all_images[neg_image]])
        fused = self.text.fuse(texts, masks, images)[:, 0]
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(fused.device)
        valid = torch.cat([torch.ones(b, dtype=torch.bool, device=fused.device), text_ok, image_ok])
        return itm_loss(self.itm_head(fused), labels, valid)

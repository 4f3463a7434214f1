"""The VLP model: ViT ⊕ BERT [+ fusion layers] [+ captioning decoder], and the objectives.

`model(batch)` computes the shared features once (`Features`) and hands them to each
enabled objective (`vlp.losses.OBJECTIVES`); it returns the weighted total `loss`, each
objective's loss by name, and their metrics. The scoring API (encode_*, filip_scores,
itm_scores, generate) is what the retrieval, zero-shot and captioning rooms use.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vlp.config import ConfigError, DataConfig, LossConfig, ModelConfig
from vlp.data.images import Normalize
from vlp.data.perturb import KINDS as NEGATIVE_KINDS
from vlp.data.perturb import negatives_for_batch
from vlp.data.text import tokenize
import vlp.losses
from vlp.losses import LossWeighting
from vlp.losses.distributed import world
from vlp.losses.objective import OwnLayersOptions, schedule_segments
from vlp.losses.filip import filip_similarity
from vlp.model.decoder import CaptionDecoder
from vlp.model.features import Features
from vlp.model.generate import generate_ids
from vlp.model.text import TextTower
from vlp.model.vision import VisionTower
from vlp.padding import trim_padding

BERT_SEP_ID = 102  # [SEP] in every BERT WordPiece vocabulary

# What each `needs` entry of an objective asks of the model, and how to provide it.
REQUIREMENTS = {
    "fusion": (lambda m: m.text.fusion_layers >= 1, "model.text.fusion_layers >= 1"),
    "decoder": (lambda m: m.decoder.enabled, "model.decoder.enabled: true"),
    "tokens": (lambda m: True, ""),
}


def enabled_objectives(model_cfg: ModelConfig, loss_cfg: LossConfig) -> list:
    """The objective classes with a weight > 0, checked against what the model provides."""
    enabled = [o for o in vlp.losses.OBJECTIVES if loss_cfg.objectives[o.name].weight > 0]
    if not enabled:
        names = "/".join(o.name for o in vlp.losses.OBJECTIVES)
        raise ConfigError(f"every loss weight is 0: enable at least one of loss.{{{names}}}")
    negatives = loss_cfg.text_negatives
    unknown = set(negatives.kinds) - set(NEGATIVE_KINDS)
    if unknown or not negatives.kinds:
        raise ConfigError(f"config key 'loss.text_negatives.kinds' must be a non-empty list of "
                          f"{NEGATIVE_KINDS}, got {negatives.kinds}")
    lm = loss_cfg.objectives["lm"]
    if lm.weight > 0 and not lm.tower_gradients and model_cfg.decoder.share_weights:
        raise ConfigError("loss.lm.tower_gradients: false keeps the captioning loss out of the towers, "
                          "but a decoder that shares the text tower's layers trains them: set "
                          "model.decoder.share_weights: false")
    for objective in enabled:
        for need in objective.needs:
            provided, how = REQUIREMENTS[need]
            if not provided(model_cfg):
                raise ConfigError(f"loss.{objective.name} > 0 needs the {need}: set {how} "
                                  f"or loss.{objective.name}: 0")
    return enabled


class VLPModel(nn.Module):
    def __init__(self, model_cfg: ModelConfig, loss_cfg: LossConfig, data_cfg: DataConfig | None = None):
        super().__init__()
        enabled = enabled_objectives(model_cfg, loss_cfg)
        needs = set().union(*(o.needs for o in enabled))
        # The data config's normalization constants: uint8 batches are normalized on the device.
        self.vision = VisionTower(model_cfg.vision, Normalize(data_cfg) if data_cfg else None)
        self.text = TextTower(model_cfg.text, self.vision.width)
        self.image_proj = nn.Linear(self.vision.width, model_cfg.embed_dim)
        self.text_proj = nn.Linear(self.text.width, model_cfg.embed_dim)
        self.text_pooling = model_cfg.text.pooling
        # Parts no enabled objective needs are not built: no dead parameters to train.
        if "tokens" in needs:
            self.image_token_proj = nn.Linear(self.vision.width, model_cfg.filip_dim)
            self.text_token_proj = nn.Linear(self.text.width, model_cfg.filip_dim)
        # The ITM head only when ITM (what needs "fusion") trains it: an untrained head would
        # score foils and rerank retrieval with noise (fusion layers may still serve the decoder).
        self.itm_head = nn.Linear(self.text.width, 2) if "fusion" in needs else None
        # Likewise the decoder only when captioning trains it: an untrained one would caption
        # the eval set and CapFilt's shards with noise.
        self.decoder = (CaptionDecoder(self.text, self.vision.width, model_cfg.decoder.share_weights)
                        if "decoder" in needs else None)
        self.max_new_tokens = model_cfg.decoder.max_new_tokens
        self.objectives = nn.ModuleDict(
            {o.name: o(loss_cfg.objectives[o.name], loss_cfg) for o in enabled})
        self.weighting = LossWeighting({name: loss_cfg.objectives[name] for name in self.objectives}, loss_cfg)
        self.init_scale = 1.0 / loss_cfg.init_temperature
        self.negatives_cfg = loss_cfg.text_negatives
        self.max_len = data_cfg.max_len if data_cfg else DataConfig().max_len
        self.progress, self.step = 0.0, 0
        self.tokenizer = None  # set by build_model / load_model_dir when one is available
        self.set_grad_checkpointing(model_cfg.grad_checkpointing)

    # ------------------------------------------------------------------ utilities
    def train(self, mode: bool = True) -> "VLPModel":
        # Locked text layers are a fixed function (LiT): no dropout in them while the rest
        # trains, so a caption's locked features are the same each time it is seen. Here, not
        # in the text tower: the decoder shares some of those modules and would switch them on.
        super().train(mode)
        for module in self.text.locked:
            module.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vision.set_grad_checkpointing(enable)
        self.text.grad_checkpointing = enable
        if self.decoder is not None:
            self.decoder.grad_checkpointing = enable

    def start_training(self, global_batch_size: int) -> None:
        """A fresh training run begins with this global batch: batch-dependent inits."""
        for objective in self.objectives.values():
            objective.start_training(global_batch_size)

    def set_training_progress(self, step: int, progress: float) -> None:
        """The trainer calls this before each step with the fraction of the run done:
        objective schedules (curriculum, ITM negative hardness) follow it."""
        self.progress, self.step = progress, step
        for objective in self.objectives.values():
            objective.set_progress(step, progress)

    def loss_names(self) -> list[str]:
        """The names of the losses the forward returns (beside "loss", the total)."""
        return list(self.objectives)

    @property
    def has_filip(self) -> bool:
        return hasattr(self, "image_token_proj")

    @property
    def has_itm(self) -> bool:
        return self.itm_head is not None

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    def _learned_scale(self, scores: str) -> torch.Tensor | None:
        for objective in self.objectives.values():
            if objective.scale_for == scores:
                return objective.logit_scale().detach()
        return None

    @property
    def logit_scale(self) -> torch.Tensor:
        """The scale s (not its log) of the global-embedding scores, as the objective that
        learns it (ITC or SigLIP) uses it; its initial value when no objective learns it."""
        learned = self._learned_scale("embeddings")
        return learned if learned is not None else torch.tensor(self.init_scale)

    @property
    def filip_logit_scale(self) -> torch.Tensor:
        self._require_filip()
        learned = self._learned_scale("tokens")
        return learned if learned is not None else torch.tensor(self.init_scale)

    def _require_filip(self) -> None:
        if not self.has_filip:
            raise ValueError("this model has no FILIP heads (it was built with loss.filip: 0)")

    # ------------------------------------------------------------------ scoring API
    # Callers that score one batch several ways compute the states once and pass them on
    # (`image_states=`, `text_states=`); the towers then do not run again.
    def encode_image_states(self, images: torch.Tensor) -> torch.Tensor:
        """ViT token states `[B, 1+N, vision_width]`: what the fusion layers attend to."""
        return self.vision(images)

    def encode_image(self, images: torch.Tensor | None = None, *,
                     image_states: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalized global image embeddings `[B, embed_dim]`."""
        if image_states is None:
            image_states = self.vision(images)
        return F.normalize(self.image_proj(image_states[:, 0]).float(), dim=-1)

    def encode_text_states(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor,
                           inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Text-only hidden states `[B, L, text_width]` (below the fusion layers)."""
        return self.text.encode(input_ids, attention_mask, inputs_embeds)

    def embed_words(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The text tower's word embeddings `[B, L, text_width]`, the input space of
        `inputs_embeds` (CoOp learns context vectors there)."""
        return self.text.embeddings.word_embeddings(input_ids)

    def encode_text(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                    text_states: torch.Tensor | None = None,
                    inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalized global text embeddings `[B, embed_dim]`."""
        if text_states is None:
            text_states = self.encode_text_states(input_ids, attention_mask, inputs_embeds)
        if self.text_pooling == "mean":
            weights = attention_mask[:, :text_states.shape[1], None].to(text_states.dtype)
            pooled = (text_states * weights).sum(1) / weights.sum(1).clamp(min=1)
        else:
            pooled = text_states[:, 0]
        return F.normalize(self.text_proj(pooled).float(), dim=-1)

    def encode_image_tokens(self, images: torch.Tensor | None = None, *,
                            image_states: torch.Tensor | None = None) -> torch.Tensor:
        """FILIP patch tokens `[B, N, filip_dim]` (CLS excluded), normalized per token."""
        self._require_filip()
        if image_states is None:
            image_states = self.vision(images)
        return F.normalize(self.image_token_proj(image_states[:, 1:]).float(), dim=-1)

    def encode_text_tokens(self, input_ids: torch.Tensor | None = None,
                           attention_mask: torch.Tensor | None = None, *,
                           text_states: torch.Tensor | None = None) -> torch.Tensor:
        """FILIP text tokens `[B, L, filip_dim]`; the real ones are where attention_mask is 1."""
        self._require_filip()
        if text_states is None:
            text_states = self.encode_text_states(input_ids, attention_mask)
        return F.normalize(self.text_token_proj(text_states).float(), dim=-1)

    def filip_scores(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                     text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(i2t, t2i) token-wise similarities, both `[B_img, B_txt]` (unscaled)."""
        self._require_filip()
        filip = self.objectives["filip"]
        return filip_similarity(image_tokens, text_tokens, text_mask, filip.options.chunk,
                                filip.similarity_dtype())

    def itm_scores(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                   images: torch.Tensor | None = None, *,
                   image_states: torch.Tensor | None = None,
                   text_states: torch.Tensor | None = None) -> torch.Tensor:
        """Match probability `[B]` of aligned (text i, image i) pairs."""
        if self.itm_head is None:
            raise ValueError("this model has no ITM head: it was trained with loss.itm: 0")
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
            raise ValueError("this model has no captioning decoder (trained with loss.lm: 0)")
        sep_id, pad_id = self._special_ids()
        was_training = self.training
        self.eval()  # no dropout while decoding, also when called mid-training
        try:
            with torch.no_grad():
                if image_states is None:
                    image_states = self.vision(images)
                return generate_ids(self.decoder, image_states, sep_id, pad_id, method,
                                    self._caption_length(max_new_tokens), **options)
        finally:
            self.train(was_training)

    def _caption_length(self, max_new_tokens: int | None) -> int:
        """The requested length, at most what the decoder's position table holds after the
        bos (a text tower with 16 positions cannot place a 20th token)."""
        requested = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        return min(requested, self.decoder.embeddings.position_embeddings.num_embeddings - 1)

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
        """([SEP], [PAD]) ids: the tokenizer's, else BERT's vocabulary layout (a model built
        from dims with no tokenizer, as in tests, still uses BERT's)."""
        if self.tokenizer is not None:
            return self.tokenizer.sep_token_id, self.tokenizer.pad_token_id
        return BERT_SEP_ID, self.text.config.pad_token_id or 0

    # ------------------------------------------------------------------ training
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Weighted total `loss`, each objective's loss by name, and `<name>_<metric>`s.
        In training, objectives whose curriculum weight is 0 now are not run."""
        multipliers = self.weighting.multipliers(self.progress if self.training else None)
        # In a second stage the towers run without autograd: no graph is kept for a backward
        # that would stop at their outputs.
        features = Features(self, batch, self._towers_learn(multipliers))
        losses, metrics = {}, {}
        for name, objective in self.objectives.items():
            if multipliers[name] == 0:
                continue
            out = objective(features)
            losses[name] = out.pop("loss")
            metrics.update({f"{name}_{key}": value for key, value in out.items()})
        total, weight_metrics = self.weighting(losses, multipliers, self.training, self._shared_grad_norms)
        return {"loss": total, **losses, **metrics, **weight_metrics}

    def towers_learn(self, progress: float) -> bool:
        """Whether an objective that trains the towers runs at `progress`; false in a second
        stage (ITM or captioning alone, with `tower_gradients: false`), where the trainer
        also gives the towers a learning rate of 0 so AdamW leaves them exactly as they are."""
        return self._towers_learn(self.weighting.multipliers(progress))

    def second_stage_start(self) -> float | None:
        """In a run where some stretch trains no tower (see `towers_learn`): the point where
        the objectives with layers of their own (ITM, captioning) join, from which those
        layers follow a learning-rate schedule of their own. None in any other run."""
        if all(self.towers_learn((left + right) / 2) for left, right in schedule_segments(self.weighting.options)):
            return None
        return min(objective.options.start for objective in self.objectives.values()
                   if isinstance(objective.options, OwnLayersOptions))

    def _towers_learn(self, multipliers: dict[str, float]) -> bool:
        return any(multipliers[name] != 0 and objective.options.trains_towers
                   for name, objective in self.objectives.items())

    def text_negatives(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Hard negative captions of a training batch (`loss.text_negatives`): (owner row,
        input_ids, attention_mask), possibly with no rows; None when off or evaluating."""
        cfg = self.negatives_cfg
        if not self.training or cfg.fraction <= 0:
            return None
        device = batch["input_ids"].device
        owners, texts = negatives_for_batch(batch["text"], cfg.fraction, tuple(cfg.kinds),
                                            seed=f"{self.step}/{world()[0]}")
        if not texts:
            empty = torch.zeros(0, 1, dtype=torch.long, device=device)
            return torch.zeros(0, dtype=torch.long, device=device), empty, empty
        tokens = tokenize(self.tokenizer, texts, self.max_len)
        ids, mask = trim_padding(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        return torch.tensor(owners, device=device), ids, mask

    def shared_layer(self) -> torch.Tensor:
        """The last weight every objective's gradient passes through (GradNorm's W): the
        final MLP of the vision tower, whose states all objectives read."""
        return self.vision.last_weight()

    def _shared_grad_norms(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """‖∇_W Lₖ‖ at the shared layer, of the losses averaged over ranks."""
        weight = self.shared_layer()
        grads = [torch.autograd.grad(loss, weight, retain_graph=True, allow_unused=True)[0] for loss in losses]
        flat = torch.stack([(g if g is not None else torch.zeros_like(weight)).float().flatten() for g in grads])
        if world()[1] > 1:
            dist.all_reduce(flat)
            flat /= world()[1]
        return flat.norm(dim=1)

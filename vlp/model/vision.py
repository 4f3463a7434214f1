"""Image tower: a timm ViT, by model name or by explicit dims; weights only from a local file."""
from __future__ import annotations

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from vlp.assets import resolve_local_file
from vlp.config import DataConfig, VisionConfig
from vlp.data.images import Normalize


class VisionTower(nn.Module):
    """forward(images) -> token states `[B, 1 + N, width]` (CLS first, after the final norm).
    `images`: uint8 pixels as the loaders deliver them, normalized here with `normalize`
    (the data config's constants) on the model's device, or floats already normalized
    (`vlp.data.eval_transform`, `load_image`)."""

    def __init__(self, cfg: VisionConfig, normalize: Normalize | None = None):
        super().__init__()
        self.normalize = normalize or Normalize(DataConfig())
        if cfg.timm_name:
            if not timm.is_model(cfg.timm_name):
                raise ValueError(f"model.vision.timm_name: unknown timm model '{cfg.timm_name}'")
            self.vit = timm.create_model(cfg.timm_name, pretrained=False, num_classes=0,
                                         img_size=cfg.image_size)
        else:
            self.vit = VisionTransformer(
                img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width,
                depth=cfg.depth, num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, num_classes=0)
        if not isinstance(self.vit, VisionTransformer):
            raise ValueError(f"model.vision.timm_name: '{cfg.timm_name}' is not a plain ViT")
        if cfg.pretrained:
            self.load_weights(cfg.pretrained)
        self.width = self.vit.embed_dim

    def load_weights(self, spec: str) -> None:
        path = resolve_local_file(spec, "vision weights (model.vision.pretrained)")
        state = timm.models.load_state_dict(str(path))
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        # timm's filter resizes position embeddings / patch kernels to this model's geometry.
        state = checkpoint_filter_fn(state, self.vit)
        missing, unexpected = self.vit.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"vision weights {path} do not fit the ViT: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vit.set_grad_checkpointing(enable)

    def last_weight(self) -> nn.Parameter:
        """The output projection of the last block's MLP: the last weight matrix every use
        of the image states depends on (the final norm has only a scale and a shift)."""
        return self.vit.blocks[-1].mlp.fc2.weight

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = self.normalize(images)
        # DeepSpeed bf16 keeps the weights in bf16; images arrive in float32.
        return self.vit.forward_features(images.to(self.vit.patch_embed.proj.weight.dtype))

"""The four objectives, each a plain function of tensors (no config): ITC, FILIP, ITM, LM."""
from vlp.losses.captioning import IGNORE, caption_loss, lm_targets
from vlp.losses.contrastive import ContrastiveLoss, LearnableScale, contrastive_loss
from vlp.losses.filip import FilipLoss, filip_loss, filip_similarity, select_tokens
from vlp.losses.matching import itm_loss, sample_hard_negatives
from vlp.losses.weighting import LossWeighting

__all__ = [
    "IGNORE", "caption_loss", "lm_targets", "ContrastiveLoss", "LearnableScale",
    "contrastive_loss", "FilipLoss", "filip_loss", "filip_similarity", "select_tokens",
    "itm_loss", "sample_hard_negatives", "LossWeighting",
]

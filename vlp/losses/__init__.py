"""The objectives, one module each (see `vlp.losses.objective` for the interface), and how
they are combined (`weighting`). A loss never reads a config file: it gets its options.

OBJECTIVES lists every objective the config knows, in the order they run; adding one is a
module with an `Objective` subclass plus its line here."""
from vlp.losses.captioning import IGNORE, LM, caption_loss, lm_targets
from vlp.losses.contrastive import ITC, LearnableScale, contrastive_loss, symmetric_cross_entropy
from vlp.losses.filip import Filip, filip_loss, filip_similarity, select_tokens
from vlp.losses.matching import ITM, itm_loss, sample_hard_negatives
from vlp.losses.objective import Objective, ObjectiveOptions, schedule_multiplier
from vlp.losses.siglip import SigLIP, sigmoid_loss
from vlp.losses.weighting import LossWeighting

OBJECTIVES: tuple[type[Objective], ...] = (ITC, SigLIP, Filip, ITM, LM)

__all__ = [
    "IGNORE", "ITC", "ITM", "LM", "OBJECTIVES", "Filip", "LearnableScale", "LossWeighting", "Objective",
    "ObjectiveOptions", "SigLIP", "caption_loss", "contrastive_loss", "filip_loss", "filip_similarity",
    "itm_loss", "lm_targets", "sample_hard_negatives", "schedule_multiplier", "select_tokens",
    "sigmoid_loss", "symmetric_cross_entropy",
]

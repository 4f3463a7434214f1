"""The data room: WebDataset shards → batches of images and tokenized captions.

See docs/architecture.md ("Data") for the batch format.
"""
from vlp.data.images import eval_transform, load_image
from vlp.data.loader import EvalLoader, TrainLoader, eval_loader, image_id, train_loader
from vlp.data.mixgen import mixgen
from vlp.data.skips import REASONS as SKIP_REASONS
from vlp.data.sources import count_samples, expand_spec
from vlp.data.text import build_tokenizer, tokenize

__all__ = [
    "EvalLoader", "SKIP_REASONS", "TrainLoader", "build_tokenizer", "count_samples", "eval_loader",
    "eval_transform", "expand_spec", "image_id", "load_image", "mixgen", "tokenize",
    "train_loader",
]

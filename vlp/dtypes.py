"""Precision names used in configs (`train.precision`, `loss.filip_precision`) → torch dtypes."""
import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

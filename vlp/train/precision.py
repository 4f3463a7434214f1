"""`train.precision: auto`: on a GPU bf16 (fp32 where bf16 is unsupported); on a CPU whichever
of bf16 and fp32 trains this model faster, measured at start-up.

Why measure: CPUs differ. On one 2-core machine kind bf16 was faster; on another with
avx512_bf16, ITC-only training ran 1.63x faster in fp32 (bench_train, 50.3 vs 30.9
samples/s), because the bf16 kernels there lose to the fp32 ones at these sizes.
"""
from __future__ import annotations

import copy
import time
import warnings

import torch
import torch.distributed as dist

from vlp.config import ConfigError

PROBE_STEPS = 2      # timed forward+backward passes per precision, after one untimed
PROBE_MAX_BATCH = 16  # a small batch: the ratio is what matters, not the absolute speed


def resolve_precision(requested: str, on_gpu: bool, bf16_supported: bool) -> str:
    """The precision the run will use; fp16 is refused on CPU (it is ~40x slower there and
    DeepSpeed's loss scaler is GPU-only), bf16 falls back to fp32 where unsupported.
    `auto` is returned as is and settled by `choose_precision` once the model exists."""
    if requested == "fp16" and not on_gpu:
        raise ConfigError("train.precision=fp16 needs a GPU; on CPU use train.precision=bf16 "
                          "(or fp32)")
    if requested == "bf16" and not bf16_supported:
        warnings.warn("bf16 is not supported on this device; training in fp32")
        return "fp32"
    return requested


def synthetic_batch(model: torch.nn.Module, image_size: int, max_len: int, batch: int) -> dict:
    """A training batch of random pixels and token ids, every caption full length (the
    slowest case the data can produce)."""
    generator = torch.Generator().manual_seed(0)
    vocab = model.text.config.vocab_size
    return {"image": torch.randint(0, 256, (batch, 3, image_size, image_size), dtype=torch.uint8,
                                   generator=generator),
            "input_ids": torch.randint(1000, vocab, (batch, max_len), generator=generator),
            "attention_mask": torch.ones(batch, max_len, dtype=torch.long),
            "image_id": torch.arange(batch)}


def seconds_per_step(model: torch.nn.Module, batch: dict, dtype: torch.dtype) -> float:
    """Mean time of a forward+backward pass of a copy of `model` in `dtype`."""
    probe = copy.deepcopy(model).to(dtype).train()
    times = []
    for i in range(1 + PROBE_STEPS):
        start = time.perf_counter()
        probe(batch)["loss"].backward()
        probe.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    del probe
    return sum(times) / len(times)


def choose_precision(requested: str, on_gpu: bool, bf16_supported: bool, model: torch.nn.Module,
                     image_size: int, max_len: int, batch: int, log=print) -> str:
    """Resolve `auto`; any other value is returned as given. Every rank probes (under the
    same load as training) and rank 0's choice is used by all."""
    if requested != "auto":
        return requested
    if on_gpu or not bf16_supported:
        return "bf16" if bf16_supported else "fp32"
    sample = synthetic_batch(model, image_size, max_len, min(batch, PROBE_MAX_BATCH))
    timings = {name: seconds_per_step(model, sample, dtype)
               for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    choice = min(timings, key=timings.get)
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([int(choice == "bf16")])
        dist.broadcast(flag, src=0)
        choice = "bf16" if flag.item() else "fp32"
    log(f"precision auto: bf16 {timings['bf16'] * 1e3:.0f} ms vs fp32 {timings['fp32'] * 1e3:.0f} ms "
        f"per probe step -> {choice}")
    return choice

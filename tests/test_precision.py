"""train.precision: auto — bf16 on a GPU, fp32 on a CPU without bf16 instructions, else the
faster of the two for this model, measured."""
from __future__ import annotations

import pytest
import torch

import vlp.train.precision as precision
from vlp.train.precision import choose_precision, cpu_has_native_bf16

FLAGS = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 {extra}\n"


def test_native_bf16_is_read_from_the_cpu_flags():
    assert cpu_has_native_bf16(FLAGS.format(extra="")) is False
    assert cpu_has_native_bf16(FLAGS.format(extra="avx512f avx512_bf16")) is True
    assert cpu_has_native_bf16(FLAGS.format(extra="amx_bf16 amx_tile")) is True
    assert cpu_has_native_bf16("no flags line here") is None


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.text = type("T", (), {"config": type("C", (), {"vocab_size": 50})()})()
        self.proj = torch.nn.Linear(4, 1)


@pytest.fixture
def probes(monkeypatch):
    calls = []

    def fake(times):
        def seconds_per_step(model, batch, dtype, give_up_after=float("inf")):
            calls.append((dtype, give_up_after))
            return times[dtype]
        monkeypatch.setattr(precision, "seconds_per_step", seconds_per_step)
        monkeypatch.setattr(precision, "synthetic_batch", lambda *a, **k: {})
    return fake, calls


def choose(requested="auto", on_gpu=False, supported=True):
    logs = []
    return choose_precision(requested, on_gpu, supported, Tiny(), 16, 8, 64, log=logs.append), logs


@pytest.mark.parametrize("fp32_s, bf16_s, want", [(1.0, 0.6, "bf16"), (1.0, 1.6, "fp32")])
def test_with_bf16_instructions_the_faster_precision_wins(monkeypatch, probes, fp32_s, bf16_s, want):
    fake, calls = probes
    fake({torch.float32: fp32_s, torch.bfloat16: bf16_s})
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    got, logs = choose()
    assert got == want and "precision auto" in logs[0]
    assert calls[1] == (torch.bfloat16, 2 * fp32_s + 1.0)  # bf16 stops timing once clearly slower


def test_without_bf16_instructions_fp32_without_a_probe(monkeypatch, probes):
    fake, calls = probes
    fake({})
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    got, logs = choose()
    assert got == "fp32" and not calls and "no bf16 instructions" in logs[0]


def test_explicit_precisions_and_gpus_are_not_probed(probes):
    fake, calls = probes
    fake({})
    assert choose("bf16")[0] == "bf16" and choose("fp32")[0] == "fp32"
    assert choose(on_gpu=True)[0] == "bf16" and choose(on_gpu=True, supported=False)[0] == "fp32"
    assert not calls


def test_a_real_probe_gives_a_finite_time_and_stops_a_slow_precision_early():
    from test_model import tiny_batch, tiny_cfg
    from vlp.model import build_model

    model = build_model(tiny_cfg())
    batch = tiny_batch(b=2)
    assert 0 < precision.seconds_per_step(model, batch, torch.float32) < float("inf")
    assert precision.seconds_per_step(model, batch, torch.float32, give_up_after=0.0) == float("inf")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the probe used a copy

"""Forward+backward cost of each objective on the demo model, relative to ITC alone.

Every variant runs in its own subprocess (so peak RSS is its own): build the model with only
the named objectives on, take one warm-up step, then time `--steps` steps of forward +
backward (bf16 autocast, as training runs on CPU) on one fixed batch of demo captions and
images. Peak memory is the growth of the process's peak RSS over its size before the first
step (activations + gradients). Ratios are against `itc` measured in the same run.

    python tools/bench_model.py [--config configs/demo.yaml] [--batch 64] [--steps 3]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

# name -> overrides on top of the config; every objective not named is switched off.
VARIANTS = {
    "itc": ["loss.itc=1"],
    "filip (all tokens)": ["loss.filip=1", "loss.filip.token_fraction=1.0"],
    "filip (top 25% tokens)": ["loss.filip=1", "loss.filip.token_fraction=0.25"],
    "itm": ["loss.itm=1"],
    "lm": ["loss.lm=1"],
    "itc+filip(25%)+itm+lm": ["loss.itc=1", "loss.filip=1", "loss.filip.token_fraction=0.25",
                              "loss.itm=1", "loss.lm=1"],
}
OFF = ["loss.itc=0", "loss.filip=0", "loss.itm=0", "loss.lm=0"]


def demo_captions(spec: str, n: int) -> list[str]:
    from vlp.data import expand_spec

    captions = []
    with tarfile.open(expand_spec(spec, "data.val")[0]) as tar:
        for member in tar:
            if member.name.endswith(".txt"):
                captions.append(tar.extractfile(member).read().decode())
            if len(captions) == n:
                break
    return captions


def measure(config: str, overrides: list[str], batch_size: int, steps: int, threads: int) -> dict:
    import torch

    from vlp.config import load_config
    from vlp.data import tokenize
    from vlp.model import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = load_config(config, overrides)
    model = build_model(cfg).train()
    model.set_training_progress(0, 1.0)  # every objective has joined (a curriculum starts some late)
    captions = demo_captions(cfg.data.val, batch_size)
    batch = dict(tokenize(model.tokenizer, captions, cfg.data.max_len),
                 image=torch.randn(len(captions), 3, cfg.model.vision.image_size, cfg.model.vision.image_size),
                 image_id=torch.arange(len(captions)))

    def step() -> tuple[float, float]:
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(batch)["loss"]
        loss.backward()
        model.zero_grad(set_to_none=False)
        return time.perf_counter() - start, time.process_time() - cpu_start

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    times = [step() for _ in range(steps)]
    return {"seconds": statistics.median(t[0] for t in times),
            "cpu_seconds": statistics.median(t[1] for t in times), "peak_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", help="comma-separated variant names (default: all)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # child process: one variant, result as JSON on stdout
        overrides = json.loads(args.worker)
        print(json.dumps(measure(args.config, overrides, args.batch, args.steps, args.threads)))
        return
    names = args.only.split(",") if args.only else list(VARIANTS)
    rows = []
    for checkpointing in (False, True):
        base = None
        for name in names:
            overrides = OFF + VARIANTS[name] + [f"model.grad_checkpointing={str(checkpointing).lower()}"]
            out = subprocess.run(
                [sys.executable, __file__, "--config", args.config, "--batch", str(args.batch),
                 "--steps", str(args.steps), "--threads", str(args.threads),
                 "--worker", json.dumps(overrides)],
                capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"variant {name!r} failed:\n{out.stderr[-3000:]}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            base = base or result
            ratio = result["seconds"] / base["seconds"]
            cpu_ratio = result["cpu_seconds"] / base["cpu_seconds"]
            rows.append((name, checkpointing, result, ratio, cpu_ratio))
            print(f"{name:24s} ckpt={checkpointing!s:5s} {result['seconds']:.3f} s/step ({ratio:.2f}x itc), "
                  f"cpu {result['cpu_seconds']:.3f} s ({cpu_ratio:.2f}x)  peak +{result['peak_mb']:.0f} MB",
                  flush=True)
    print("\n| objectives | grad ckpt | wall s/step | × ITC alone | CPU s/step | × ITC alone (CPU) "
          "| peak RSS growth (MB) |")
    print("|---|---|---|---|---|---|---|")
    for name, checkpointing, result, ratio, cpu_ratio in rows:
        print(f"| {name} | {'on' if checkpointing else 'off'} | {result['seconds']:.3f} | {ratio:.2f} | "
              f"{result['cpu_seconds']:.3f} | {cpu_ratio:.2f} | {result['peak_mb']:.0f} |")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()

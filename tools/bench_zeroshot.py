"""Zero-shot speed: images/s for itc vs filip scoring, and class-embedding time.

    python tools/bench_zeroshot.py [--model MODEL_DIR] [--config configs/demo.yaml]

Without --model a freshly initialized model from --config is used (speed does not depend
on the weights). Baselines are measured in the same run: filip against itc, and prompt
encoding in length-sorted, trimmed batches against batches in template order padded to
data.max_len (what a plain `encode_text` loop over the tokenizer's output does).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vlp.config import load_config
from vlp.data import tokenize
from vlp.model import build_model
from vlp.zeroshot.classifier import EmbeddingCache, TextEncoder, ZeroShotClassifier, prompts_for
from vlp.zeroshot.run import load_model
from vlp.zeroshot.templates import IMAGENET80


def class_names(tokenizer, n: int) -> list[str]:
    """n distinct real words from the tokenizer's vocabulary (deterministic)."""
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) >= 5]
    return sorted(words)[:: max(1, len(words) // n)][:n]


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_scoring(model, encoder, names, images, batch_size) -> dict:
    out = {}
    for scoring in ("itc", "filip"):
        classifier = ZeroShotClassifier(model, encoder, names, ["a photo of a {}."], scoring)
        classifier.probabilities(images[:batch_size])  # warm-up

        def run():
            for chunk in images.split(batch_size):
                classifier.probabilities(chunk)

        out[scoring] = len(images) / timed(run, repeat=2)
    return out


def bench_padded_vs_trimmed(model, encoder, prompts) -> dict:
    """Same prompts, same batch size: padded to max_len (baseline) vs length-sorted+trimmed."""
    @torch.no_grad()
    def padded():
        for start in range(0, len(prompts), encoder.batch_size):
            batch = tokenize(encoder.tokenizer, prompts[start:start + encoder.batch_size], encoder.max_len)
            model.encode_text(batch["input_ids"], batch["attention_mask"])

    return {"padded_s": timed(padded), "trimmed_s": timed(lambda: encoder.embed(prompts))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="exported model directory (default: fresh model from --config)")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--classes", type=int, nargs="+", default=[10, 100])
    p.add_argument("--embed-classes", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/bench_zeroshot")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model:
        model, cfg, tokenizer = load_model(args.model)
    else:
        cfg = load_config(args.config)
        model = build_model(cfg).eval()
        tokenizer = model.tokenizer
    encoder = TextEncoder(model, tokenizer, cfg.data.max_len, batch_size=256, progress=False)
    size = cfg.model.vision.image_size
    images = torch.randn(args.images, 3, size, size)
    results = {"model": args.model or args.config, "threads": args.threads, "images": args.images,
               "image_size": size, "batch_size": args.batch_size, "scoring": {}}

    for n in args.classes:
        speed = bench_scoring(model, encoder, class_names(tokenizer, n), images, args.batch_size)
        speed["filip_over_itc"] = speed["filip"] / speed["itc"]
        results["scoring"][str(n)] = speed
        print(f"{n:5d} classes: itc {speed['itc']:.0f} img/s, filip {speed['filip']:.0f} img/s "
              f"(filip/itc {speed['filip_over_itc']:.2f})", flush=True)

    names = class_names(tokenizer, args.embed_classes)
    subset = prompts_for(names[:100], IMAGENET80[:20])
    pad = bench_padded_vs_trimmed(model, encoder, subset)
    pad["speedup"] = pad["padded_s"] / pad["trimmed_s"]
    pad["prompts"] = len(subset)
    results["trim_vs_padded"] = pad
    print(f"{len(subset)} prompts: padded to max_len {pad['padded_s']:.2f}s, sorted+trimmed "
          f"{pad['trimmed_s']:.2f}s ({pad['speedup']:.2f}x)", flush=True)

    cache_dir = Path(args.out) / "cache"
    cache = EmbeddingCache(cache_dir, f"bench-{time.time()}")  # a fresh key: never a stale hit
    build = lambda: ZeroShotClassifier(model, encoder, names, IMAGENET80, cache=cache)  # noqa: E731
    compute_s = timed(build)
    cached_s = timed(build)
    n_prompts = len(names) * len(IMAGENET80)
    results["class_embedding"] = {"classes": len(names), "templates": len(IMAGENET80),
                                  "prompts": n_prompts, "compute_s": compute_s,
                                  "prompts_per_s": n_prompts / compute_s, "cached_s": cached_s,
                                  "cache_speedup": compute_s / cached_s}
    print(f"class embeddings {len(names)} x {len(IMAGENET80)}: {compute_s:.1f}s "
          f"({n_prompts / compute_s:.0f} prompts/s), from cache {cached_s:.3f}s", flush=True)
    for f in cache_dir.glob("itc-*.pt"):
        f.unlink()
    print(json.dumps(results))


if __name__ == "__main__":
    main()

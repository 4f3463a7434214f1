"""Caption generation speed: captions/s with the decoder's key/value cache against the
same generation without it (the whole prefix again at every step), in one run.

    python tools/bench_caption.py --model MODEL_DIR [--images 128] [--batch-size 32]

MODEL_DIR: a model pretrained with captioning (`loss.lm=1`; configs/demo.yaml leaves it off).
Without --model a freshly initialized model from --config, captioning on, is used; an untrained decoder
rarely emits [SEP], so every caption runs to max_new_tokens (the cache's best case). A
trained model gives the realistic figure. Each method is timed cached and uncached,
alternately, best of --repeat. Greedy and beam captions must be identical (else it stops);
for nucleus the share of identical captions is reported: the cache changes logits in the
last float bits, and a sampled token can flip where a near-flat distribution's nucleus
boundary or the sampler's draw falls between them (an untrained model's flat output).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from vlp.config import load_config
from vlp.data import eval_loader

METHODS = {"greedy": {"method": "greedy"}, "beam": {"method": "beam", "num_beams": 3},
           "nucleus": {"method": "nucleus", "top_p": 0.9}}


def load(args):
    if args.model:
        from vlp.model import load_model_dir
        model, cfg, _ = load_model_dir(args.model)
        return model, cfg
    from vlp.model import build_model
    cfg = load_config(args.config, ["loss.lm=1"])  # a model has a decoder only where captioning trains
    torch.manual_seed(0)
    return build_model(cfg).eval(), cfg


def val_images(cfg, spec: str | None, n: int) -> torch.Tensor:
    cfg.data.workers = 0
    images = []
    for batch in eval_loader(cfg.data, None, spec=spec, rank=0, world_size=1):
        images.append(batch["image"])
        if sum(len(i) for i in images) >= n:
            break
    return torch.cat(images)[:n]


def timed_captions(model, images, options, batch_size, cache: bool, seed: int) -> tuple[float, list]:
    if options["method"] == "nucleus":
        options = {**options, "generator": torch.Generator().manual_seed(seed)}
    start, out = time.perf_counter(), []
    with torch.no_grad():
        for chunk in images.split(batch_size):
            out += model.generate_ids(chunk, cache=cache, **options).tolist()
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="exported model directory (default: fresh model from --config)")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--shards", default=None, help="images from these shards (default: the config's data.val)")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, cfg = load(args)
    images = val_images(cfg, args.shards, args.images)
    results = {}
    for name, options in METHODS.items():
        best = {True: float("inf"), False: float("inf")}
        outputs = {}
        timed_captions(model, images[:args.batch_size], options, args.batch_size, True, 0)  # warm-up
        for _ in range(args.repeat):
            for cache in (False, True):
                seconds, outputs[cache] = timed_captions(model, images, options, args.batch_size, cache, 0)
                best[cache] = min(best[cache], seconds)
        same = sum(a == b for a, b in zip(outputs[True], outputs[False])) / len(images)
        if name != "nucleus" and same < 1.0:
            raise SystemExit(f"{name}: cached and uncached captions differ ({same:.1%} identical)")
        lengths = [len([t for t in row if t != 0]) for row in outputs[True]]
        results[name] = {"uncached_captions_per_s": len(images) / best[False],
                         "cached_captions_per_s": len(images) / best[True],
                         "speedup": best[False] / best[True],
                         "mean_tokens": sum(lengths) / len(lengths), "identical": same}
        print(f"{name:<8} uncached {results[name]['uncached_captions_per_s']:7.1f}/s  cached "
              f"{results[name]['cached_captions_per_s']:7.1f}/s  x{results[name]['speedup']:.2f}  "
              f"({results[name]['mean_tokens']:.1f} tokens a caption, {same:.0%} identical)", flush=True)
    print(json.dumps({"model": args.model or f"fresh:{args.config}", "images": len(images),
                      "batch_size": args.batch_size, "threads": args.threads, **results}))


if __name__ == "__main__":
    main()

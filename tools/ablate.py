"""Ablation: named variants of a recipe (config overrides), each trained for the same
wall-clock budget on each data set and seed, then evaluated alike — ITC / ITM-rerank / FILIP
retrieval on the val split (the training evaluation: every caption), zero-shot top-1 (the
`simple` templates and bare class names), and seconds per step. A table (mean ± sd over
seeds) and a bar chart per metric.

    # issue 15's ablation: loss balancing and softmax vs sigmoid ITC, emoji demo + fonts
    python tools/ablate.py --budget-minutes 4 --seeds 0 1 --fonts /work/devdata/fonts \\
        --variants fixed uncertainty dwa gradnorm sigmoid --out runs/ablate
    # any variant: NAME=KEY=VALUE,KEY=VALUE
    python tools/ablate.py --variants fixed 'late=loss.itm.start=0.5,loss.lm.start=0.5'
    # the relations set (tools/make_relations_shards.py): no classes, so no zero-shot; its
    # foil test instead (foils_itc / foils_filip / foils_itm / foils_rerank)
    python tools/ablate.py --datasets relations --relations /data/relations --variants fixed late

Runs one after another (put it under `flock /tmp/vlp-heavy.lock` on a shared machine);
results.json / results.md / results.png are rewritten after every run, so a cut run keeps
what it measured. Runs made separately (one seed at a time, or on the same machine another
day) are pooled into one table and chart with

    python tools/ablate.py --merge runs/ablate/A/results.json runs/ablate/B/results.json --out runs/ablate/all
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("ablate")

# Issue 15's variants; `fixed` is the recipe as configured.
VARIANTS = {
    "fixed": ["loss.weighting=fixed"],
    "uncertainty": ["loss.weighting=uncertainty"],
    "dwa": ["loss.weighting=dwa"],
    "gradnorm": ["loss.weighting=gradnorm"],
    "sigmoid": ["loss.itc=0", "loss.siglip=1"],
}
METRICS = ("itc_t2i_r1", "itc_t2i_r10", "itm_rerank_t2i_r1", "filip_t2i_r1", "zeroshot_simple_top1",
           "zeroshot_none_top1", "foils_itc", "foils_itm", "foils_rerank", "seconds_per_step")


def load_bench_recipe():
    """tools/bench_recipe.py: the budgeted vlp arm and the scoring both benches share."""
    spec = importlib.util.spec_from_file_location("bench_recipe", REPO / "tools/bench_recipe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def data_sets(fonts: Path | None, relations: Path | None = None) -> dict[str, dict[str, str]]:
    demo = REPO / "shards/demo"
    sets = {"demo": {"train": f"{demo}/train-{{000000..000007}}.tar", "val": f"{demo}/val-{{000000..000001}}.tar",
                     "zeroshot": f"{demo}/val-{{000000..000001}}.tar", "label_field": "group",
                     "classes": str(REPO / "configs/demo_classes.txt")}}
    if fonts is not None:
        sets["fonts"] = {"train": f"{fonts}/train-{{000000..000003}}.tar", "val": f"{fonts}/val-{{000000..000001}}.tar",
                         "zeroshot": f"{fonts}/zeroshot-{{000000..000001}}.tar", "label_field": "class",
                         "classes": str(fonts / "classes.txt")}
    if relations is not None:
        sets["relations"] = {"train": f"{relations}/train-{{000000..000003}}.tar",
                             "val": f"{relations}/val-{{000000..000001}}.tar",
                             "foils": str(relations / "foils.jsonl"), "foil_images": str(relations)}
    return sets


def parse_variant(text: str) -> tuple[str, list[str]]:
    if text in VARIANTS:
        return text, VARIANTS[text]
    if "=" not in text:
        raise SystemExit(f"error: unknown variant {text!r}: use one of {list(VARIANTS)} or NAME=KEY=VALUE,...")
    name, overrides = text.split("=", 1)
    return name, overrides.split(",")


@torch.no_grad()
def training_eval(model_dir: Path, val_spec: str) -> dict[str, float]:
    """ITC / ITM-rerank / FILIP recall of the exported model, as the training eval scores it."""
    from vlp.data import eval_loader
    from vlp.model import load_model_dir
    from vlp.train.evaluate import evaluate

    model, cfg, tokenizer = load_model_dir(model_dir)
    cfg.data.workers = 0
    batches = eval_loader(cfg.data, tokenizer, spec=val_spec, rank=0, world_size=1)
    results = evaluate(model.float(), batches, device="cpu", dtype=torch.float32,
                       rerank_k=cfg.eval.itm_rerank_k, batch_size=cfg.eval.batch_size)
    return {f"{method}_{key}": value for method in ("itc", "itm_rerank", "filip") if method in results
            for key, value in results[method].items()}


class RunScorer:
    """What every run on one data set is scored on: the training eval on its val split; its
    zero-shot split when it lists classes; its foil test when it has one."""

    def __init__(self, bench_recipe, data_cfg, spec: dict[str, str]) -> None:
        from vlp.zeroshot.classes import load_classes

        self.bench, self.spec = bench_recipe, spec
        self.zeroshot = self.foils = None
        if "classes" in spec:
            classes = load_classes(spec["classes"])
            self.val = bench_recipe.load_eval_set(data_cfg, spec["val"])
            self.zeroshot = bench_recipe.load_eval_set(data_cfg, spec["zeroshot"], spec["label_field"],
                                                       classes.index())
            self.prompts, self.n_classes = bench_recipe.prompt_sets(classes.names), len(classes)
        if "foils" in spec:
            self.foils = bench_recipe.FoilEval.read(spec["foils"], spec["foil_images"])

    def __call__(self, model_dir: Path) -> dict[str, float]:
        metrics = training_eval(model_dir, self.spec["val"])
        if self.zeroshot is not None:
            emb = self.bench.vlp_embeddings(model_dir, self.val, self.zeroshot, self.prompts)
            scores = self.bench.score(emb, torch.tensor(self.zeroshot.labels), self.n_classes)
            metrics.update({k: v for k, v in scores.items() if k.startswith("zeroshot")})
        if self.foils is not None:
            metrics.update(self.bench.vlp_foil_scorers(model_dir, self.foils, ("itc", "filip", "itm", "rerank")))
        return metrics


def plot(results: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    datasets = sorted({d for d, _ in (key.split("/", 1) for key in summary)})
    variants = list(dict.fromkeys(key.split("/", 1)[1] for key in summary))
    shown = [m for m in measured(summary) if m != "seconds_per_step"]
    fig, axes = plt.subplots(len(datasets), len(shown), figsize=(3.2 * len(shown), 3 * len(datasets)), squeeze=False)
    for row, dataset in enumerate(datasets):
        for col, metric in enumerate(shown):
            ax = axes[row][col]
            means = [summary.get(f"{dataset}/{v}", {}).get(metric, {}).get("mean", float("nan")) for v in variants]
            sds = [summary.get(f"{dataset}/{v}", {}).get(metric, {}).get("sd", 0.0) for v in variants]
            ax.bar(range(len(variants)), means, yerr=sds, color="tab:blue", alpha=0.8)
            ax.set_xticks(range(len(variants)), variants, rotation=45, ha="right", fontsize=7)
            ax.set_title(f"{dataset}: {metric}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def measured(summary: dict) -> list[str]:
    """The metrics some run has (zero-shot needs classes, the foil test a foil file)."""
    return [m for m in METRICS if any(m in s for s in summary.values())]


def markdown(results: dict) -> str:
    metrics = measured(results["summary"])
    lines = ["| data set | variant | " + " | ".join(metrics) + " | runs |", "|" + "---|" * (len(metrics) + 3)]
    for key, s in results["summary"].items():
        dataset, variant = key.split("/", 1)
        cells = [f"{s[m]['mean']:.3f} ± {s[m]['sd']:.3f}" if m in s else "–" for m in metrics]
        lines.append(f"| {dataset} | {variant} | " + " | ".join(cells) + f" | {s['runs']} |")
    return "\n".join(lines) + "\n"


def summarize(runs: list[dict], spread) -> dict:
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(f"{run['dataset']}/{run['variant']}", []).append(run["metrics"])
    return {key: {"runs": len(ms), **{m: spread([x[m] for x in ms]) for m in METRICS if all(m in x for x in ms)}}
            for key, ms in groups.items()}


def write_results(results: dict, work: Path, spread) -> None:
    from vlp.atomic import atomic_write_json, atomic_write_text

    results["summary"] = summarize(results["runs"], spread)
    atomic_write_json(work / "results.json", results)
    atomic_write_text(work / "results.md", markdown(results))
    plot(results, work / "results.png")


def merge(files: list[Path], out: Path, spread) -> dict:
    """One results.json from several: their runs pooled; the budgets must agree (a table
    mixing budgets would compare unlike runs)."""
    parts = [json.loads(f.read_text()) for f in files]
    budgets = {part["budget_minutes"] for part in parts}
    if len(budgets) > 1:
        raise SystemExit(f"error: cannot merge runs of different budgets {sorted(budgets)} minutes")
    merged = {**parts[0], "command": [part["command"] for part in parts], "merged_from": [str(f) for f in files],
              "runs": [run for part in parts for run in part["runs"]]}
    for part in parts[1:]:
        merged["variants"].update(part["variants"])
        merged["datasets"].update(part["datasets"])
    out.mkdir(parents=True, exist_ok=True)
    write_results(merged, out, spread)
    return merged


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--datasets", nargs="+", default=None, help="demo, fonts, relations (default: all available)")
    p.add_argument("--fonts", type=Path, help="a tools/make_font_shards.py output directory")
    p.add_argument("--relations", type=Path, help="a tools/make_relations_shards.py output directory")
    p.add_argument("--config", type=Path, default=REPO / "configs/demo.yaml")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every variant")
    p.add_argument("--budget-minutes", type=float, default=4.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", type=Path, default=REPO / "runs/ablate")
    p.add_argument("--merge", type=Path, nargs="+", metavar="RESULTS_JSON",
                   help="pool earlier results.json files into --out instead of training")
    args = p.parse_args(argv)
    bench_recipe = load_bench_recipe()
    if args.merge:
        print(markdown(merge(args.merge, args.out, bench_recipe.spread)))
        return 0
    from vlp.config import load_config

    variants = dict(parse_variant(v) for v in args.variants)
    sets = data_sets(args.fonts, args.relations)
    unknown = set(args.datasets or ()) - set(sets)
    if unknown:
        raise SystemExit(f"error: data sets {sorted(unknown)} are not available: --fonts DIR / --relations DIR "
                         f"add fonts / relations; have {sorted(sets)}")
    chosen = {name: sets[name] for name in (args.datasets or sets)}
    work = args.out / datetime.now().strftime("%Y%m%d-%H%M%S")
    results = {"command": " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
               "budget_minutes": args.budget_minutes, "config": str(args.config), "common": args.set,
               "variants": variants, "datasets": chosen, "runs": []}
    for dataset, spec in chosen.items():
        (work / dataset).mkdir(parents=True, exist_ok=True)
        cfg = load_config(args.config, args.set)
        scorer = RunScorer(bench_recipe, cfg.data, spec)
        for seed in args.seeds:
            for name, overrides in variants.items():
                bench_args = argparse.Namespace(config=args.config, train=spec["train"], vlp_ranks=1,
                                                set=[*args.set, *overrides])
                bench = bench_recipe.Bench(bench_args, work / dataset, args.budget_minutes * 60, 0,
                                           bench_recipe.vlp_budget(cfg.train, args.budget_minutes))
                run = bench.train_vlp(f"{name}-seed{seed}", seed)
                metrics = scorer(Path(run["model_dir"]))
                metrics["seconds_per_step"] = run["train_seconds"] / max(1, run["steps"])
                results["runs"].append({"dataset": dataset, "variant": name, "seed": seed, "steps": run["steps"],
                                        "train_seconds": run["train_seconds"], "metrics": metrics})
                write_results(results, work, bench_recipe.spread)
                print(json.dumps(results["runs"][-1]), flush=True)
    print(markdown(results))
    print(f"results: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

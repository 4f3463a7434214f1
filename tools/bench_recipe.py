"""vlp's default recipe against open_clip's own trainer at equal wall-clock, on the same shards
in the same run: both train for --budget-minutes of training time, then both are scored by
vlp's metric code on the same images and texts: zero-shot top-1 (the `simple` templates and
bare class names, `none`) and retrieval R@1/R@10 on the val split. Seeds run interleaved
(open_clip 0, vlp 0, open_clip 1, ...) so a drift in machine speed hits both arms alike; the
report gives mean and spread over seeds.

    flock /tmp/vlp-heavy.lock python tools/bench_recipe.py --budget-minutes 5 --seeds 0 1 2
    python tools/bench_recipe.py --train 'DIR/train-{0000..0009}.tar' --val 'DIR/val-0000.tar' \
        --zeroshot 'DIR/zs-0000.tar' --label-field LABEL --classes DIR/classes.txt --out runs/bench_x

The vlp arm is `deepspeed pipelines/pretrain.py --config CONFIG` (configs/demo.yaml unless
--config) with `train.max_minutes` = open_clip's training time (below; train.steps raised so
that the budget ends the run, the recipe's warmup kept as the same fraction of it); its own
evaluation is off and it checkpoints only at the end.
The open_clip arm is open_clip's trainer (ITC only, from scratch, towers OPENCLIP_MODEL) in
its own virtualenv; it has no time budget, so its sample count is fitted to B from its step
times (a probe, then the previous seed's run), and its precision is whichever of amp_bf16 and
fp32 the probe finds faster. Its steps can still run slower than the ones they were fitted
to, so each seed's vlp arms run after it with `train.max_minutes` set to the training time
open_clip actually spent: the arms are equal by construction, B is their target. Training
time = the sum of both trainers' own step times (data waits included; start-up, checkpoint
export and evaluation excluded); the process wall time is reported beside it.

Evaluation texts: each val image's first caption (its .txt, the caption open_clip's trainer
reads; vlp also trains on json "captions"). open_clip's embeddings come from
tools/openclip_embed.py run by --openclip-python.

--variant NAME KEY=VALUE ... (repeatable) trains one more vlp arm per seed, the recipe with
those overrides, right after the default one and before open_clip: candidate recipes meet the
same open_clip run on the same machine.

--foils FILE adds a foil test (vlp/foils formats): both arms pick the true caption among its
foils by ITC (`foils_itc`), and vlp also by FILIP, ITM and the rerank score (`foils_filip`,
`foils_itm`, `foils_rerank`) where its arm trains them; per type in results.json. `--classes ''` leaves zero-shot out
(a set without classes, such as tools/make_relations_shards.py's).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEMO = REPO / "shards/demo"
VENV = ".bench/openclip-venv"
VENV_RECIPE = (f"python3 -m venv {VENV} && {VENV}/bin/pip install torch==2.14.1 torchvision==0.29.1 "
               "'open-clip-torch[training]' 'webdataset<=0.2.86'")
TEMPLATE_SETS = ("simple", "none")
OPENCLIP_NAME = "vlp-recipe-match"
# From scratch, tiny: ViT 4x192 (patch 8), text transformer 4x256; image size and embedding
# width follow the vlp config.
OPENCLIP_TOWERS = {"vision_cfg": {"layers": 4, "width": 192, "head_width": 64},
                   "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4}}
OPENCLIP_PRECISIONS = ("fp32", "amp_bf16")
METRIC_TITLES = {"zeroshot_simple_top1": "zero-shot top-1 simple", "zeroshot_none_top1": "zero-shot top-1 bare names",
                 "t2i_r1": "t2i R@1", "t2i_r10": "t2i R@10", "i2t_r1": "i2t R@1", "i2t_r10": "i2t R@10",
                 "foils_itc": "foils ITC", "foils_filip": "foils FILIP", "foils_itm": "foils ITM",
                 "foils_rerank": "foils rerank"}
log = logging.getLogger("bench_recipe")


# --------------------------------------------------------------------------- budget arithmetic

def steady_step_seconds(step_times: list[float], skip: int) -> float:
    """Median step time after the first `skip` steps (start-up: first batch, allocator
    warm-up). The median, because a burst of slow steps (another process on the machine)
    in the run it is read from must not set the next run's step count: a mean did, once
    giving open_clip 301 steps for a 300-s budget and the next seed half that."""
    steady = step_times[skip:] if len(step_times) > skip else step_times[-1:]
    if not steady:
        raise ValueError("no step times to calibrate from")
    return statistics.median(steady)


def steps_within(step_times: list[float], budget_s: float, skip: int) -> int:
    """Steps whose total time fits the budget: the first `skip` as measured, the rest at the
    steady step time. At least 1."""
    head = sum(step_times[:skip])
    per_step = steady_step_seconds(step_times, skip)
    return max(1, min(skip, len(step_times)) + math.floor(max(0.0, budget_s - head) / per_step))


def warmup_steps(steps: int, fraction: float) -> int:
    return max(1, round(steps * fraction))


# --------------------------------------------------------------------------- aggregation

def spread(values: list[float]) -> dict[str, float]:
    """mean, sample standard deviation (0 for one value), min, max, n."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarize(runs: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{arm: {metric or timing: spread over seeds}}; a metric an arm lacks is left out."""
    out: dict[str, dict] = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == arm]
        values = {m: [r["metrics"][m] for r in mine] for m in METRIC_TITLES if all(m in r["metrics"] for r in mine)}
        for timing in ("train_seconds", "wall_seconds", "steps"):
            values[timing] = [r[timing] for r in mine]
        out[arm] = {name: spread(v) for name, v in values.items()}
    return out


# --------------------------------------------------------------------------- scoring

@dataclass
class EvalSet:
    """Images (uint8, the eval loader's resize) with their sample keys and shards, plus for the
    retrieval set one caption per image and for the zero-shot set one class index per image."""
    shards: list[str]
    keys: list[str] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)  # uint8 batches
    captions: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)


def score(emb: dict[str, torch.Tensor], zeroshot_labels: torch.Tensor | None, n_classes: int,
          foils: "FoilEval | None" = None) -> dict[str, float]:
    """Every metric from L2-normalized embeddings: `val_images` [N, D] and `captions` [N, D]
    (caption i describes image i); `zeroshot_images` [M, D]; `prompts_<set>` [C*T, D],
    class-major (vlp.zeroshot's prompt order and template ensemble); `foil_images`,
    `foil_texts` for a foil test."""
    from vlp.metrics import retrieval_recall, topk_accuracy
    from vlp.zeroshot.classifier import ensemble

    n = len(emb["val_images"])
    out = retrieval_recall(emb["val_images"] @ emb["captions"].T, torch.arange(n))
    if foils is not None:
        out["foils_itc"] = foils.itc_accuracy(emb["foil_images"], emb["foil_texts"])
    if zeroshot_labels is None:
        return out
    for name in TEMPLATE_SETS:
        classes = ensemble(emb[f"prompts_{name}"], n_classes)
        out[f"zeroshot_{name}_top1"] = topk_accuracy(emb["zeroshot_images"] @ classes.T, zeroshot_labels,
                                                     ks=(1,))["top1"]
    return out


def prompt_sets(classnames: list[str]) -> dict[str, list[str]]:
    from vlp.zeroshot.classifier import prompts_for
    from vlp.zeroshot.templates import load_templates
    return {f"prompts_{name}": prompts_for(classnames, load_templates(name)) for name in TEMPLATE_SETS}


def load_eval_set(data_cfg, spec: str, label_field: str | None = None,
                  class_index: dict[str, int] | None = None) -> EvalSet:
    """One pass of vlp's eval loader over `spec` (its parsing and skip rules). With a label
    field, images whose label is missing or not a listed class are counted and left out."""
    from vlp.data import eval_loader, expand_spec

    out = EvalSet(shards=expand_spec(spec))
    for batch in eval_loader(dataclasses.replace(data_cfg, val=spec), None, rank=0, world_size=1):
        out.skipped.update(batch["skipped"])
        first = torch.searchsorted(batch["text_image_index"], torch.arange(len(batch["key"])))
        keep = []
        for i, (key, meta) in enumerate(zip(batch["key"], batch["meta"])):
            if label_field is not None:
                if label_field not in meta:
                    out.skipped[f"no '{label_field}' field"] += 1
                    continue
                if str(meta[label_field]) not in class_index:
                    out.skipped["label not in the class list"] += 1
                    continue
                out.labels.append(class_index[str(meta[label_field])])
            keep.append(i)
            out.keys.append(key)
            out.captions.append(batch["text"][int(first[i])])
        out.images.append(batch["image"][keep].clone())
    if not out.keys:
        raise SystemExit(f"error: no usable images in {spec} (skipped: {dict(out.skipped)})")
    if out.skipped:
        log.warning("%s: left out %s", spec, dict(out.skipped))
    return out


@dataclass
class FoilEval:
    """A foil test as both arms score it: the distinct image files and texts, and per test
    the rows of its images and texts (index 0 the true ones)."""
    foil_set: object  # vlp.foils.formats.FoilSet
    files: list[str]
    texts: list[str]
    tests: list[tuple[list[int], list[int]]]

    @classmethod
    def read(cls, path: str, images_root: str | None) -> "FoilEval":
        from vlp.foils.formats import read_foils
        foil_set = read_foils(path, images_root)
        files = list(dict.fromkeys(str(foil_set.resolve(i)) for item in foil_set.items for i in item.images))
        texts = list(dict.fromkeys(c for item in foil_set.items for c in item.captions))
        row, col = {f: i for i, f in enumerate(files)}, {t: i for i, t in enumerate(texts)}
        tests = [([row[str(foil_set.resolve(i))] for i in item.images], [col[c] for c in item.captions])
                 for item in foil_set.items]
        return cls(foil_set, files, texts, tests)

    def report(self, images: torch.Tensor, texts: torch.Tensor) -> dict:
        """vlp.foils' report of the ITC scorer from the two arms' embeddings alike."""
        from vlp.foils import report
        outcomes = []
        for item, (rows, cols) in zip(self.foil_set.items, self.tests):
            scores = images[rows] @ texts[cols].T
            outcomes.append(report.judge(item, {"itc": (scores, scores)}))
        return report.summarize(outcomes, ("itc",), self.foil_set.skipped)

    def itc_accuracy(self, images: torch.Tensor, texts: torch.Tensor) -> float:
        return self.report(images, texts)["itc"]


@torch.no_grad()
def vlp_embeddings(model_dir: Path, val: EvalSet, zeroshot: EvalSet | None, prompts: dict,
                   foils: FoilEval | None = None) -> dict:
    from vlp.data import load_image
    from vlp.model import load_model_dir
    from vlp.zeroshot.classifier import TextEncoder

    model, cfg, tokenizer = load_model_dir(model_dir)
    model = model.float().eval()
    encoder = TextEncoder(model, tokenizer, cfg.data.max_len, progress=False)
    emb = {"val_images": torch.cat([model.encode_image(b).float() for b in val.images]),
           "captions": encoder.embed(val.captions)}
    if zeroshot is not None:
        emb["zeroshot_images"] = torch.cat([model.encode_image(b).float() for b in zeroshot.images])
    emb.update({name: encoder.embed(texts) for name, texts in prompts.items()})
    if foils is not None:
        images = torch.stack([load_image(f, cfg.data) for f in foils.files])
        emb["foil_images"] = torch.cat([model.encode_image(b).float() for b in images.split(256)])
        emb["foil_texts"] = encoder.embed(foils.texts)
    return emb


@torch.no_grad()
def vlp_foil_scorers(model_dir: Path, foils: FoilEval,
                     names: tuple[str, ...] = ("filip", "itm", "rerank")) -> dict[str, float]:
    """vlp's own foil report: foils_<name> for each scorer in `names` the model has (ITC comes
    from the embeddings both arms share, `score`)."""
    from vlp.foils.run import evaluate_foils
    from vlp.model import load_model_dir

    model, cfg, tokenizer = load_model_dir(model_dir)
    report = evaluate_foils(model.float().eval(), tokenizer, foils.foil_set, cfg.data)
    return {f"foils_{name}": report[name] for name in names if name in report}


def openclip_embeddings(python: str, models: Path, checkpoint: Path, val: EvalSet, zeroshot: EvalSet | None,
                        prompts: dict, work: Path, foils: FoilEval | None = None) -> dict:
    manifest = {"image_sets": {"val_images": {"shards": val.shards, "keys": val.keys}},
                "text_sets": {"captions": val.captions, **prompts}}
    if zeroshot is not None:
        manifest["image_sets"]["zeroshot_images"] = {"shards": zeroshot.shards, "keys": zeroshot.keys}
    if foils is not None:
        manifest["image_sets"]["foil_images"] = {"files": foils.files}
        manifest["text_sets"]["foil_texts"] = foils.texts
    work.mkdir(parents=True, exist_ok=True)
    (work / "manifest.json").write_text(json.dumps(manifest))
    run_logged([python, str(REPO / "tools/openclip_embed.py"), "--model-dir", str(models), "--model",
                OPENCLIP_NAME, "--checkpoint", str(checkpoint), "--manifest", str(work / "manifest.json"),
                "--out", str(work)], work / "embed.log", openclip_env())
    return {name: torch.from_numpy(np.load(work / f"{name}.npy")) for name in [*manifest["image_sets"],
                                                                                *manifest["text_sets"]]}


# --------------------------------------------------------------------------- the two trainers

def run_logged(cmd: list[str], log_path: Path, env: dict, limit_s: float | None = None) -> tuple[float, bool]:
    """Run with output in `log_path` -> (wall seconds, finished). Past `limit_s` the run is
    stopped (finished False); a failure raises with the log's tail. The run is a process
    group of its own, stopped whole when this process is interrupted or terminated."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            return time.perf_counter() - started, False
        except BaseException:
            stop_group(proc)
            raise
    if code != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{cmd[0]} ... exited {code} (log {log_path}):\n{tail}")
    return time.perf_counter() - started, True


def stop_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def openclip_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(len(os.sched_getaffinity(0)))}


def vlp_step_times(run_dir: Path) -> list[float]:
    """Per-step seconds from metrics.jsonl (the bench logs every step), data waits included."""
    from vlp.config import load_config

    cfg = load_config(run_dir / "config.yaml")
    per_step = cfg.data.batch_size * cfg.train.grad_accum
    times, last = [], 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] != "train":
            continue
        ranks = round(rec["samples_per_s"] / rec["samples_per_s_per_rank"])
        times += [per_step * ranks / rec["samples_per_s"]] * (rec["step"] - last)
        last = rec["step"]
    return times


def openclip_step_times(log_text: str) -> list[float]:
    """open_clip logs "Batch (t): 1.234" per logged step: the mean over the steps since the last
    log line, so with --log-every-n-steps 1 each step's own time (data wait included)."""
    return [float(t) for t in re.findall(r"Train Epoch: .*?Batch \(t\): ([\d.]+)", log_text)]


@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    budget_s: float
    openclip_batch: int  # vlp's global batch
    vlp_budget: list[str]  # overrides that end the vlp run at the budget (vlp_budget())

    def budget_of(self, seconds: float) -> list[str]:
        """The budget overrides with the time budget set to `seconds` (open_clip's measured
        training time, which the vlp arms of the same seed then match)."""
        return [f"train.max_minutes={seconds / 60:.4f}" if o.startswith("train.max_minutes=") else o
                for o in self.vlp_budget]

    def vlp_command(self, run_dir: Path, seed: int, overrides: list[str] = (),
                    budget: list[str] | None = None) -> list[str]:
        ranks = ["--num_accelerators", str(self.args.vlp_ranks)] if self.args.vlp_ranks > 1 else []
        return [str(BIN / "deepspeed"), *ranks, str(REPO / "pipelines/pretrain.py"),
                "--config", str(self.args.config), f"output_dir={run_dir}", f"data.train={self.args.train}",
                "data.val=", f"train.seed={seed}", f"data.seed={seed}", "train.checkpoint_every=0",
                "train.log_every=1", *(budget or self.vlp_budget), *self.args.set, *overrides]

    def train_vlp(self, name: str, seed: int, arm: str = "vlp", overrides: list[str] = (),
                  budget: list[str] | None = None) -> dict:
        run_dir = self.work / name
        env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
        wall, _ = run_logged(self.vlp_command(run_dir, seed, overrides, budget), self.work / f"{name}.log", env)
        times = vlp_step_times(run_dir)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in records if r["kind"] == "train"][-1]
        return {"arm": arm, "seed": seed, "steps": len(times), "train_seconds": sum(times),
                "budget_clock_seconds": 60 * last.get("train_minutes", math.nan),
                "wall_seconds": wall, "step_times": times, "model_dir": str(run_dir / "model")}

    def openclip_command(self, name: str, seed: int, steps: int, precision: str) -> list[str]:
        batch = self.openclip_batch
        code = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
                "from open_clip_train.main import main; main(sys.argv[2:])")
        return [self.args.openclip_python, "-c", code, str(self.work / "openclip-models"),
                "--model", OPENCLIP_NAME, "--train-data", self.args.train, "--dataset-type", "webdataset",
                "--dataset-resampled", "--train-num-samples", str(steps * batch), "--batch-size", str(batch),
                "--epochs", "1", "--workers", "1", "--precision", precision, "--lr", str(self.args.openclip_lr),
                "--warmup", str(warmup_steps(steps, self.args.warmup_fraction)), "--log-every-n-steps", "1",
                "--device", "cpu", "--logs", str(self.work), "--name", name, "--report-to", "",
                "--save-frequency", "1", "--seed", str(seed)]

    def train_openclip(self, name: str, seed: int, steps: int, precision: str,
                       limit_s: float | None = None) -> dict:
        """A run of `steps` steps; past `limit_s` (a probe) it is cut and reports the steps it logged."""
        log_path = self.work / f"{name}.log"
        wall, finished = run_logged(self.openclip_command(name, seed, steps, precision), log_path,
                                    openclip_env(), limit_s)
        times = openclip_step_times(log_path.read_text(errors="replace"))
        if finished and len(times) != steps:
            raise RuntimeError(f"open_clip {name}: {len(times)} step times in {log_path}, expected {steps}")
        return {"arm": "open_clip", "seed": seed, "steps": len(times), "train_seconds": sum(times),
                "wall_seconds": wall, "finished": finished, "step_times": times, "precision": precision,
                "checkpoint": str(self.work / name / "checkpoints/epoch_1.pt")}

    def probe_openclip(self) -> tuple[str, list[float], dict]:
        """The faster precision (or the one asked for) and its step times from a short run. The
        second probe is cut at 1.5x the first one's wall time: by then it has lost (without
        bf16 instructions, amp_bf16 on a CPU can be ~50x slower than fp32)."""
        asked = self.args.openclip_precision
        probes, limit = {}, None
        for precision in OPENCLIP_PRECISIONS if asked == "auto" else (asked,):
            run = self.train_openclip(f"probe-openclip-{precision}", 0, self.args.probe_steps, precision, limit)
            probes[precision] = run
            limit = limit or 1.5 * run["wall_seconds"]
        seconds = {p: steady_step_seconds(r["step_times"], self.args.probe_skip) if r["step_times"] else math.inf
                   for p, r in probes.items()}
        chosen = min(seconds, key=seconds.get)
        log.info("open_clip steady step seconds %s: using %s", seconds, chosen)
        report = {p: {"steady_step_seconds": seconds[p], "steps_logged": r["steps"], "finished": r["finished"],
                      "wall_seconds": r["wall_seconds"]} for p, r in probes.items()}
        return chosen, probes[chosen]["step_times"], {"chosen": chosen, "probes": report}


# --------------------------------------------------------------------------- the run

def vlp_budget(train, minutes: float) -> list[str]:
    """Overrides that make the budget, not train.steps, end the vlp run, keeping the recipe's
    warmup as the same fraction of the run."""
    warmup = train.warmup_fraction or train.warmup_steps / train.steps
    return [f"train.max_minutes={minutes:g}", f"train.warmup_fraction={warmup:g}", "train.steps=1000000"]


def write_openclip_model(models: Path, cfg) -> None:
    spec = json.loads(json.dumps(OPENCLIP_TOWERS))
    spec["embed_dim"] = cfg.model.embed_dim
    spec["vision_cfg"].update(image_size=cfg.model.vision.image_size, patch_size=cfg.model.vision.patch_size)
    models.mkdir(parents=True, exist_ok=True)
    (models / f"{OPENCLIP_NAME}.json").write_text(json.dumps(spec))


def vlp_arms(variants: list[list[str]] | None) -> list[tuple[str, list[str]]]:
    """("vlp", []) and one (NAME, overrides) per `--variant NAME KEY=VALUE ...`."""
    arms = [("vlp", [])] + [(v[0], v[1:]) for v in variants or []]
    names = [name for name, _ in arms]
    if len(set(names)) < len(names) or "open_clip" in names:
        raise ValueError(f"--variant names must be unique and not vlp or open_clip: {names}")
    return arms


def run_seeds(bench: Bench, sets: tuple[EvalSet, EvalSet | None, dict, FoilEval | None], n_classes: int,
              results: dict, save) -> None:
    """open_clip seed s, then vlp seed s (and each --variant's), each scored right after it
    trains. open_clip has no time budget and its steps can run slower than the ones its
    step count was fitted to (seen: 348 s for a 300-s budget), so the vlp arms get the
    training time open_clip actually spent: equal by construction."""
    val, zeroshot, prompts, foils = sets
    labels = torch.tensor(zeroshot.labels) if zeroshot is not None else None
    args = bench.args
    precision, openclip_times, results["openclip_probe"] = bench.probe_openclip()
    results["openclip_precision"] = precision
    for seed in args.seeds:
        steps = steps_within(openclip_times, bench.budget_s, args.probe_skip)
        run = bench.train_openclip(f"openclip-seed{seed}", seed, steps, precision)
        emb = openclip_embeddings(args.openclip_python, bench.work / "openclip-models", Path(run["checkpoint"]),
                                  val, zeroshot, prompts, bench.work / f"openclip-seed{seed}-embeddings", foils)
        run["metrics"] = score(emb, labels, n_classes, foils)
        openclip_times = run["step_times"]
        save(run)
        budget = bench.budget_of(run["train_seconds"])
        for arm, overrides in args.arms:
            run = bench.train_vlp(f"{arm}-seed{seed}", seed, arm, overrides, budget)
            model_dir = Path(run["model_dir"])
            run["metrics"] = score(vlp_embeddings(model_dir, val, zeroshot, prompts, foils), labels, n_classes, foils)
            if foils is not None:
                run["metrics"].update(vlp_foil_scorers(model_dir, foils))
            save(run)


def fmt(s: dict[str, float], digits: int = 3) -> str:
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


def markdown(results: dict) -> str:
    metrics = [m for m in METRIC_TITLES if any(m in r["metrics"] for r in results["runs"])]
    titles = [METRIC_TITLES[m] for m in metrics]
    head = "| arm | " + " | ".join(titles) + " | steps | training s | process wall s |"
    lines = [head, "|" + "---|" * (len(metrics) + 4)]
    for arm, s in results["summary"].items():
        cells = [fmt(s[m]) if m in s else "–" for m in metrics] + [
            fmt(s["steps"], 0), fmt(s["train_seconds"], 0), fmt(s["wall_seconds"], 0)]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "| arm | seed | " + " | ".join(titles) + " | steps | training s | process wall s |",
              "|" + "---|" * (len(metrics) + 5)]
    for r in results["runs"]:
        cells = [f"{r['metrics'][m]:.3f}" if m in r["metrics"] else "–" for m in metrics] + [
            str(r["steps"]), f"{r['train_seconds']:.0f}", f"{r['wall_seconds']:.0f}"]
        lines.append(f"| {r['arm']} | {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", default=str(DEMO / "train-{000000..000007}.tar"), help="training shards (both arms)")
    p.add_argument("--val", default=str(DEMO / "val-{000000..000001}.tar"), help="retrieval val shards")
    p.add_argument("--zeroshot", help="zero-shot shards (default: --val)")
    p.add_argument("--label-field", default="group", help="json field of a zero-shot sample's class")
    p.add_argument("--classes", default=str(REPO / "configs/demo_classes.txt"),
                   help="class list: a text file, one a line, or json {label: name}; '' for no zero-shot")
    p.add_argument("--foils", help="a foil test file (vlp/foils formats) to score both arms on")
    p.add_argument("--foils-images", help="root of the foil file's relative image paths (default: its folder)")
    p.add_argument("--config", type=Path, default=REPO / "configs/demo.yaml", help="the vlp recipe")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for the vlp arm")
    p.add_argument("--variant", nargs="+", action="append", metavar="NAME KEY=VALUE",
                   help="one more vlp arm, trained after the default one on each seed: the recipe with "
                        "these overrides on top of --set (repeatable)")
    p.add_argument("--vlp-ranks", type=int, default=1, help="vlp ranks (deepspeed --num_accelerators)")
    p.add_argument("--budget-minutes", type=float, default=5.0, help="training time of each arm")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--openclip-python", default=str(REPO / VENV / "bin/python"))
    p.add_argument("--openclip-precision", choices=("auto", *OPENCLIP_PRECISIONS), default="auto",
                   help="auto: the faster one in a probe")
    p.add_argument("--openclip-lr", type=float, default=5e-4)
    p.add_argument("--warmup-fraction", type=float, default=0.1, help="open_clip warmup, of its steps")
    p.add_argument("--probe-steps", type=int, default=12, help="steps of each open_clip speed probe")
    p.add_argument("--probe-skip", type=int, default=3, help="first steps of a run not taken as steady")
    p.add_argument("--out", type=Path, default=REPO / "runs/bench_recipe", help="a folder per invocation (its start time) holds runs, logs and results")
    args = p.parse_args(argv)
    args.zeroshot = args.zeroshot or args.val
    try:
        args.arms = vlp_arms(args.variant)
    except ValueError as err:
        p.error(str(err))
    if not Path(args.openclip_python).is_file():
        p.error(f"no open_clip python at {args.openclip_python}; create the virtualenv (from the repository "
                f"root) with:\n    {VENV_RECIPE}\nor pass --openclip-python PATH")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Terminated, stop the run in progress too (run_logged stops its process group on the way out).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args = parse_args(argv)
    from vlp.config import ConfigError, load_config
    from vlp.zeroshot.classes import load_classes
    from vlp.foils.formats import FoilsError
    from vlp.zeroshot.errors import ZeroShotError
    from vlp.atomic import atomic_write_json, atomic_write_text

    try:
        cfg = load_config(args.config, args.set)
        for _, overrides in args.arms[1:]:
            load_config(args.config, [*args.set, *overrides])  # a bad key fails now, not after hours
        classes = load_classes(args.classes) if args.classes else None
        val = load_eval_set(cfg.data, args.val)
        zeroshot = (load_eval_set(cfg.data, args.zeroshot, args.label_field, classes.index())
                    if classes is not None else None)
        foils = FoilEval.read(args.foils, args.foils_images) if args.foils else None
    except (ConfigError, ZeroShotError, FileNotFoundError, FoilsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    work = args.out / datetime.now().strftime("%Y%m%d-%H%M%S")
    write_openclip_model(work / "openclip-models", cfg)
    results = {"command": " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
               "budget_minutes": args.budget_minutes, "config": str(args.config), "vlp_overrides": args.set,
               "vlp_variants": dict(args.arms[1:]),
               "train": args.train, "val": args.val,
               "zeroshot": args.zeroshot, "label_field": args.label_field, "classes": args.classes,
               "val_images": len(val.keys), "zeroshot_images": len(zeroshot.keys) if zeroshot else 0,
               "foils": args.foils, "foil_tests": len(foils.tests) if foils else 0,
               "skipped": {"val": dict(val.skipped), "zeroshot": dict(zeroshot.skipped) if zeroshot else {}},
               "eval_texts": "first caption of each val image (.txt)", "runs": []}

    def save(run: dict) -> None:
        results["runs"].append({k: v for k, v in run.items() if k != "step_times"})
        results["summary"] = summarize(results["runs"])
        atomic_write_json(work / "results.json", results)
        atomic_write_text(work / "results.md", markdown(results))
        print(json.dumps({k: results["runs"][-1][k] for k in ("arm", "seed", "steps", "train_seconds",
                                                              "wall_seconds", "metrics")}), flush=True)

    bench = Bench(args, work, args.budget_minutes * 60, cfg.data.batch_size * cfg.train.grad_accum * args.vlp_ranks,
                  vlp_budget(cfg.train, args.budget_minutes))
    prompts = prompt_sets(classes.names) if classes is not None else {}
    run_seeds(bench, (val, zeroshot, prompts, foils), len(classes) if classes else 0, results, save)
    print(markdown(results))
    print(f"results: {work / 'results.json'}, {work / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

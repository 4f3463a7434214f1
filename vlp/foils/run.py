"""Foil evaluation over a model: batches of tests, their images decoded and transformed as
in evaluation, each scorer's verdicts, the report. Used by pipelines/foils.py and, through
`training_foils` (config key `eval.foils`), by the training eval."""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from tqdm import tqdm

from vlp.config import Config, ConfigError, DataConfig
from vlp.data.images import decode_image, eval_transform, load_image
from vlp.data.text import tokenize
from vlp.foils import report
from vlp.foils.formats import FoilItem, FoilSet, FoilsError, read_foils
from vlp.foils.score import score_tests, scorers_of

log = logging.getLogger(__name__)
# Skipped tests named one by one in the log, per reason; the rest are only counted.
LOGGED_SKIPS = 5


@torch.no_grad()
def evaluate_foils(model, tokenizer, foil_set: FoilSet, data_cfg: DataConfig, *,
                   device="cpu", dtype=torch.float32, batch_size: int = 64,
                   progress: bool = False) -> dict[str, Any]:
    """The report (vlp.foils.report.summarize) of every test in `foil_set`. A test whose
    image is missing or unreadable is skipped, counted by reason and logged."""
    scorers = scorers_of(model)
    skipped = Counter(foil_set.skipped)
    outcomes: list[report.Outcome] = []
    started = time.perf_counter()
    bar = tqdm(total=len(foil_set.items), unit="test", desc="foils", disable=not progress)
    for chunk in _chunks(foil_set.items, batch_size):
        images, tests, kept = _load_images(chunk, foil_set, data_cfg, skipped)
        if kept:
            captions = list(dict.fromkeys(c for item in kept for c in item.captions))
            column = {c: i for i, c in enumerate(captions)}
            tokens = tokenize(tokenizer, captions, data_cfg.max_len)
            tests = [(rows, [column[c] for c in item.captions]) for rows, item in zip(tests, kept)]
            scored = score_tests(model, images, tokens["input_ids"], tokens["attention_mask"], tests,
                                 device=device, dtype=dtype, pair_batch=batch_size)
            outcomes += [report.judge(item, matrices) for item, matrices in zip(kept, scored)]
        bar.update(len(chunk))
    bar.close()
    if sum(skipped.values()) > sum(foil_set.skipped.values()):
        log.warning("foils: skipped %d of %d tests: %s", sum(skipped.values()),
                    len(foil_set.items) + sum(foil_set.skipped.values()), dict(skipped))
    out = report.summarize(outcomes, scorers, skipped)
    out["seconds"] = time.perf_counter() - started
    return out


def _chunks(items: list[FoilItem], images_per_batch: int) -> Iterator[list[FoilItem]]:
    chunk, n_images = [], 0
    for item in items:
        chunk.append(item)
        n_images += len(item.images)
        if n_images >= images_per_batch:
            yield chunk
            chunk, n_images = [], 0
    if chunk:
        yield chunk


def _load_images(chunk: list[FoilItem], foil_set: FoilSet, data_cfg: DataConfig, skipped: Counter):
    """(images [N,3,S,S], each kept test's image rows, the kept tests). An image shared by
    several tests of the chunk is decoded once."""
    row_of: dict[tuple, int] = {}
    images, tests, kept = [], [], []
    for item in chunk:
        rows = []
        try:
            for name in item.images:
                key = (name, item.box)
                if key not in row_of:
                    images.append(_load(foil_set.resolve(name), item.box, data_cfg))
                    row_of[key] = len(images) - 1
                rows.append(row_of[key])
        except (FileNotFoundError, ValueError, OSError) as err:
            reason = "missing_image" if isinstance(err, FileNotFoundError) else "unreadable_image"
            skipped[reason] += 1
            if skipped[reason] <= LOGGED_SKIPS:
                log.warning("foils: %s: %s; skipped", item.where, err)
            continue
        tests.append(rows)
        kept.append(item)
    return (torch.stack(images) if images else None), tests, kept


def _load(path: Path, box: Optional[tuple], data_cfg: DataConfig) -> torch.Tensor:
    if box is None:
        return load_image(path, data_cfg)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    # ARO's box is in the file's pixels: decode at full size (no reduced JPEG draft).
    image = decode_image(path.read_bytes(), min_side=1 << 30)
    return eval_transform(data_cfg)(image.crop(box))


# --------------------------------------------------------------------------- training eval

@dataclass
class TrainingFoils:
    """The foil test the training eval adds (`eval.foils`); the file is read and checked
    when training starts, not at the first eval."""
    foil_set: FoilSet
    data_cfg: DataConfig
    batch_size: int

    def __call__(self, model, device, dtype) -> dict[str, Any]:
        return evaluate_foils(model, model.tokenizer, self.foil_set, self.data_cfg,
                              device=device, dtype=dtype, batch_size=self.batch_size)


def training_foils(cfg: Config) -> Optional[TrainingFoils]:
    if not cfg.eval.foils:
        return None
    if not cfg.data.val:
        raise ConfigError("config key 'eval.foils' needs data.val: the foil test runs with the val eval")
    try:
        foil_set = read_foils(cfg.eval.foils, cfg.eval.foils_images)
    except FoilsError as err:
        raise ConfigError(f"config key 'eval.foils': {err}") from None
    return TrainingFoils(foil_set, cfg.data, cfg.eval.batch_size)


# --------------------------------------------------------------------------- the pipeline

@dataclass
class FoilOptions:
    model: str
    foils: str
    images: Optional[str] = None
    out: str = "runs/foils"
    batch_size: int = 64
    device: str = "cpu"
    progress: bool = True


def run(opts: FoilOptions) -> dict[str, Any]:
    """Read, score, write `foils.json` and `foils.png` under `opts.out`; the report."""
    foil_set = read_foils(opts.foils, opts.images)
    from vlp.model import load_model_dir  # heavy import, after the cheap checks
    model, cfg, tokenizer = load_model_dir(opts.model, device=opts.device)
    result = evaluate_foils(model, tokenizer, foil_set, cfg.data, device=opts.device,
                            batch_size=opts.batch_size, progress=opts.progress)
    if result["n"] == 0:
        raise FoilsError(f"no test of {foil_set.path} could be scored (skipped: {result['skipped']}); "
                         f"relative image paths resolve against {foil_set.root} (--images)")
    result.update(model=str(opts.model), foils=str(foil_set.path), images=str(foil_set.root))
    report.write_report(Path(opts.out), result)
    return result

"""What a zero-shot run leaves behind: metrics, predictions.csv, and two pictures.

Everything is written atomically (temp file + os.replace) so an interrupted run never
leaves a half-written report that looks complete.
"""
from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vlp.atomic import atomic_write, atomic_write_json

from vlp.metrics import topk_accuracy
from vlp.zeroshot.classes import ClassList
from vlp.zeroshot.errors import ZeroShotError

log = logging.getLogger(__name__)

TOP_K = 5
MISTAKES_SHOWN = 16


@dataclass
class Predictions:
    """Accumulates a run's outputs batch by batch."""
    keys: list[str] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)
    # (confidence, key, thumbnail HWC uint8, predicted index, true index)
    mistakes: list[tuple] = field(default_factory=list)

    def add(self, keys, labels, probs: torch.Tensor, thumbs: np.ndarray | None,
            class_index: dict[str, int]) -> None:
        self.keys += keys
        self.labels += labels
        self.probs.append(probs.float().cpu())
        if thumbs is None:
            return
        conf, pred = probs.max(1)
        for i, label in enumerate(labels):
            true = class_index.get(label, -1) if label is not None else -1
            if true >= 0 and int(pred[i]) != true:
                self.mistakes.append((float(conf[i]), keys[i], thumbs[i], int(pred[i]), true))
        self.mistakes = sorted(self.mistakes, key=lambda m: -m[0])[:MISTAKES_SHOWN]

    def matrix(self, n_classes: int) -> torch.Tensor:
        return torch.cat(self.probs) if self.probs else torch.empty(0, n_classes)


def classification_metrics(probs: torch.Tensor, labels: list[str | None],
                           classes: ClassList) -> dict:
    """top-1/top-5, mean per-class accuracy, per-class accuracy and counts.

    Images whose label is not in the class list cannot be right; they are left out of the
    accuracies and named under `unknown_labels` so a label mismatch is visible.
    """
    index = classes.index()
    target = torch.tensor([index.get(l, -1) if l is not None else -1 for l in labels],
                          dtype=torch.long)
    unknown = Counter(l for l in labels if l is not None and l not in index)
    known = target >= 0
    probs, target = probs[known], target[known]
    n = int(known.sum())
    out = {"n": n, "n_predicted": len(labels), "unknown_labels": dict(unknown.most_common())}
    if n == 0:
        return {**out, "top1": None, "top5": None, "mean_per_class": None,
                "per_class": {}, "confusion": []}
    acc = topk_accuracy(probs, target, ks=(1, TOP_K))
    pred = probs.argmax(1)
    n_classes = len(classes)
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    confusion.index_put_((target, pred), torch.ones_like(target), accumulate=True)
    per_class = {}
    for c, label in enumerate(classes.labels):
        count = int(confusion[c].sum())
        per_class[label] = {"n": count,
                            "accuracy": float(confusion[c, c]) / count if count else None}
    seen = [v["accuracy"] for v in per_class.values() if v["n"]]
    return {**out, "top1": acc["top1"], f"top{TOP_K}": acc[f"top{TOP_K}"],
            "mean_per_class": float(np.mean(seen)), "per_class": per_class,
            "confusion": confusion.tolist()}


def summary_line(metrics: dict) -> str:
    keys = ("top1", "top5", "mean_per_class", "n")
    return json.dumps({k: metrics.get(k) for k in keys})


# --------------------------------------------------------------------------- files

def write_predictions_csv(path: Path, preds: Predictions, classes: ClassList) -> None:
    probs = preds.matrix(len(classes))
    k = min(TOP_K, len(classes))
    top_p, top_i = probs.topk(k, dim=1) if len(probs) else (probs, probs.long())

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as f:
            out = csv.writer(f)
            header = ["key", "label", "correct"]
            for r in range(1, k + 1):
                header += [f"top{r}", f"p{r}"]
            out.writerow(header)
            for row, (key, label) in enumerate(zip(preds.keys, preds.labels)):
                best = [classes.labels[int(i)] for i in top_i[row]]
                correct = "" if label is None else int(best[0] == label)
                cells = [key, label or "", correct]
                for name, p in zip(best, top_p[row].tolist()):
                    cells += [name, f"{p:.4f}"]
                out.writerow(cells)

    atomic_write(path, write)


def plot_confusion(path: Path, confusion: list[list[int]], classes: ClassList) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(confusion, dtype=float)
    rows = counts.sum(1, keepdims=True)
    rates = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    n = len(classes)
    size = min(4 + 0.45 * n, 20)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    shown = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(shown, ax=ax, fraction=0.046, label="fraction of the true class")
    if n <= 40:  # beyond that tick labels are unreadable; the json keeps the numbers
        names = [_short(c) for c in classes.names]
        ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
        if n <= 20:
            for t in range(n):
                for p in range(n):
                    if counts[t, p]:
                        ax.text(p, t, int(counts[t, p]), ha="center", va="center", fontsize=7,
                                color="white" if rates[t, p] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"zero-shot confusion ({int(counts.sum())} images)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def plot_mistakes(path: Path, preds: Predictions, classes: ClassList) -> bool:
    """Grid of the most confident wrong predictions; False when there were none."""
    if not preds.mistakes:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = (len(preds.mistakes) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 3.1), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (conf, key, thumb, pred, true) in zip(axes.flat, preds.mistakes):
        ax.imshow(thumb)
        ax.set_title(f"said: {_short(classes.names[pred])} ({conf:.0%})\n"
                     f"true: {_short(classes.names[true])}\n{_short(Path(key).name, 28)}",
                     fontsize=8)
    fig.suptitle("most confident mistakes", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return True


def thumbnails(images: torch.Tensor, mean: list[float], std: list[float]) -> np.ndarray:
    """Undo the eval normalization: [B,3,H,W] float -> [B,H,W,3] uint8 for plotting."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    pixels = (images.float().cpu() * s + m).clamp(0, 1)
    return (pixels.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def _short(text: str, width: int = 22) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def finish_report(out: Path, preds: Predictions, classes: ClassList, source, seconds: float, opts,
                  extra: dict | None = None) -> dict:
    """Metrics (when the images are labelled), predictions.csv, confusion and mistakes PNGs
    and metrics.json under `out`; `opts` is the run's ZeroShotOptions."""
    probs = preds.matrix(len(classes))
    if source.labelled:
        metrics = classification_metrics(probs, preds.labels, classes)
    else:
        metrics = {"n": 0, "n_predicted": len(preds.keys), "top1": None, "top5": None,
                   "mean_per_class": None}
    if not preds.keys:
        raise ZeroShotError(f"no readable images in {opts.images} (skipped: {dict(source.skipped)})")
    if metrics.get("unknown_labels"):
        log.warning("labels not in the class list (left out of accuracy): %s",
                    _describe(metrics["unknown_labels"]))
    metrics.update({
        "skipped": dict(source.skipped),
        "images_per_s": len(preds.keys) / max(seconds, 1e-9),
        "scoring": opts.scoring, "templates": opts.templates, "model": str(opts.model),
        "images": opts.images, "n_classes": len(classes), **(extra or {}),
    })
    if source.skipped:
        log.warning("skipped images: %s", dict(source.skipped))
    write_predictions_csv(out / "predictions.csv", preds, classes)
    confusion = metrics.pop("confusion", None)
    if confusion:
        plot_confusion(out / "confusion.png", confusion, classes)
        atomic_write_json(out / "confusion.json",
                          {"labels": classes.labels, "matrix": confusion})
    plot_mistakes(out / "mistakes.png", preds, classes)
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def _describe(counts: dict) -> str:
    items = list(counts.items())
    text = ", ".join(f"{label!r} ({n})" for label, n in items[:20])
    return text + (f" and {len(items) - 20} more" if len(items) > 20 else "")

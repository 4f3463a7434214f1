"""Foil accuracies per scorer and per type, with chance levels; table, summary line, chart.

A test is passed when the true caption scores strictly above every foil for the true image
(a tie is a failure: a scorer that cannot tell the captions apart has not chosen). The
image side, where a test has foil images: the true image strictly above every foil image
for the true caption. Winoground pairs (2 captions × 2 images) also get Winoground's text,
image and group scores (Thrush et al. 2022).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from vlp.atomic import atomic_write, atomic_write_json
from vlp.foils.formats import FoilItem
from vlp.foils.score import Matrices

WINOGROUND_CHANCE = {"text": 0.25, "image": 0.25, "group": 1 / 6}
ALL = "all"


@dataclass
class Outcome:
    """One test's verdict for each scorer."""
    type: str
    n_captions: int
    n_images: int
    text: dict[str, bool]
    image: dict[str, bool] = field(default_factory=dict)
    winoground: dict[str, dict[str, bool]] = field(default_factory=dict)


def judge(item: FoilItem, matrices: Matrices) -> Outcome:
    outcome = Outcome(item.type, len(item.captions), len(item.images), {})
    for name, (by_caption, by_image) in matrices.items():
        outcome.text[name] = bool(by_caption[0, 0] > by_caption[0, 1:].max())
        if len(item.images) > 1:
            outcome.image[name] = bool(by_image[0, 0] > by_image[1:, 0].max())
        if item.winoground:
            text = bool(by_caption[0, 0] > by_caption[0, 1]) and bool(by_caption[1, 1] > by_caption[1, 0])
            image = bool(by_image[0, 0] > by_image[1, 0]) and bool(by_image[1, 1] > by_image[0, 1])
            outcome.winoground[name] = {"text": text, "image": image, "group": text and image}
    return outcome


def summarize(outcomes: list[Outcome], scorers: tuple[str, ...], skipped: dict[str, int]) -> dict[str, Any]:
    """{"n", "chance", <scorer>: accuracy, ["image": {...}], ["winoground": {...}],
    "by_type": {type: the same}, "scorers", "skipped"}."""
    report = _block(outcomes, scorers)
    types = sorted({o.type for o in outcomes})
    report["by_type"] = {t: _block([o for o in outcomes if o.type == t], scorers) for t in types}
    report["scorers"] = list(scorers)
    report["skipped"] = dict(skipped)
    return report


def _block(outcomes: list[Outcome], scorers: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(outcomes),
                           "chance": _mean([1 / o.n_captions for o in outcomes]),
                           **{s: _mean([o.text[s] for o in outcomes]) for s in scorers}}
    with_images = [o for o in outcomes if o.image]
    if with_images:
        out["image"] = {"n": len(with_images), "chance": _mean([1 / o.n_images for o in with_images]),
                        **{s: _mean([o.image[s] for o in with_images]) for s in scorers}}
    pairs = [o for o in outcomes if o.winoground]
    if pairs:
        out["winoground"] = {"n": len(pairs), "chance": WINOGROUND_CHANCE, **{
            s: {k: _mean([o.winoground[s][k] for o in pairs]) for k in WINOGROUND_CHANCE}
            for s in scorers}}
    return out


def _mean(values: list) -> Optional[float]:
    return sum(values) / len(values) if values else None


def summary_line(report: dict[str, Any]) -> dict[str, Any]:
    """The last line the pipeline prints: n, chance, caption accuracy per scorer, the image
    side's when there is one, and the same per type."""
    keys = ["n", "chance", *report["scorers"]]
    out = {k: report[k] for k in keys}
    if "image" in report:
        out["image"] = {k: report["image"][k] for k in keys}
    out["by_type"] = {t: {k: block[k] for k in keys} for t, block in report["by_type"].items()}
    return out


def one_line(report: dict[str, Any]) -> str:
    """For the training eval table."""
    accuracies = "  ".join(f"{s} {_fmt(report[s])}" for s in report["scorers"])
    return f"foils (n={report['n']}, chance {_fmt(report['chance'])}): {accuracies}"


def format_table(report: dict[str, Any]) -> str:
    scorers = report["scorers"]
    groups = {ALL: report, **report["by_type"]}
    width = max(12, *(len(t) + 2 for t in groups))
    header = f"{'type':<{width}}{'n':>6}{'chance':>8}" + "".join(f"{s:>8}" for s in scorers)
    lines = ["true caption ranked first:", header]
    lines += [_row(name, block, scorers, width) for name, block in groups.items()]
    if "image" in report:
        lines += ["true image ranked first (tests with foil images):", header]
        lines += [_row(name, block["image"], scorers, width)
                  for name, block in groups.items() if "image" in block]
    if "winoground" in report:
        lines += ["Winoground pairs, text / image / group score:",
                  f"{'type':<{width}}{'n':>6}" + "".join(f"{s:>20}" for s in scorers)]
        for name, block in groups.items():
            if "winoground" in block:
                wino = block["winoground"]
                cells = ("/".join(_fmt(wino[s][k]) for k in WINOGROUND_CHANCE) for s in scorers)
                lines.append(f"{name:<{width}}{wino['n']:>6}" + "".join(f"{c:>20}" for c in cells))
    if report["skipped"]:
        lines.append(f"skipped: {report['skipped']}")
    return "\n".join(lines)


def _row(name: str, block: dict[str, Any], scorers: list[str], width: int) -> str:
    return (f"{name:<{width}}{block['n']:>6}{_fmt(block['chance']):>8}"
            + "".join(f"{_fmt(block[s]):>8}" for s in scorers))


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def write_report(out: Path, report: dict[str, Any]) -> None:
    atomic_write_json(out / "foils.json", report)
    plot_accuracy(out / "foils.png", report)


def plot_accuracy(path: Path, report: dict[str, Any]) -> None:
    """Bars per scorer for all tests and each type; a black tick marks each group's chance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = [("true caption ranked first", lambda block: block)]
    if "image" in report:
        sides.append(("true image ranked first", lambda block: block.get("image")))
    scorers = report["scorers"]
    groups = {ALL: report, **report["by_type"]}
    fig, axes = plt.subplots(len(sides), 1, figsize=(max(5.0, 1.2 * len(groups) * len(scorers) / 2 + 2),
                                                     3.4 * len(sides)), squeeze=False)
    bar = 0.8 / len(scorers)
    for ax, (title, side) in zip(axes[:, 0], sides):
        names = [name for name, block in groups.items() if side(block)]
        for j, scorer in enumerate(scorers):
            values = [side(groups[name])[scorer] or 0.0 for name in names]
            ax.bar([i + (j - (len(scorers) - 1) / 2) * bar for i in range(len(names))], values,
                   bar, label=scorer)
        for i, name in enumerate(names):
            ax.hlines(side(groups[name])["chance"], i - 0.45, i + 0.45, colors="black",
                      linestyles="dashed", label="chance" if i == 0 else None)
        ax.set_xticks(range(len(names)), [f"{name}\n(n={side(groups[name])['n']})" for name in names],
                      fontsize=8)
        ax.set_ylim(0, 1.15)  # room for the legend above a bar at 1
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1])
        ax.set_ylabel("accuracy")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, ncol=len(scorers) + 1, loc="upper right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)

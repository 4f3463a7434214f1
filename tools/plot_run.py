"""Plot a run's loss terms, objective weights and eval metrics over steps into a PNG.

    python tools/plot_run.py runs/demo            # → runs/demo/metrics.png
    python tools/plot_run.py runs/demo --out plot.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

METHODS = ("itc", "itm_rerank", "filip")


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (is {run_dir} a training run directory?)")
    train, evals = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a crash mid-write
            print(f"plot_run: skipping unreadable line {number} of {path}", file=sys.stderr)
            continue
        (evals if record.get("kind") == "eval" else train).append(record)
    return train, evals


def objective_names(train: list[dict]) -> list[str]:
    """Every objective a run logged: the model logs `weight_<name>` beside each loss."""
    names = {key[len("weight_"):] for r in train for key in r if key.startswith("weight_")}
    return sorted(names)


def plot(run_dir: Path, out: Path) -> Path:
    train, evals = read_metrics(run_dir)
    objectives = objective_names(train)
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.5))
    ax = axes[0]
    for term in ("loss", *objectives):
        points = [(r["step"], r[term]) for r in train if term in r]
        if points:
            ax.plot(*zip(*points), label=term, lw=2 if term == "loss" else 1)
    ax.set(title="training loss", xlabel="step", yscale="log")
    ax.legend()
    ax = axes[1]
    for term in objectives:
        points = [(r["step"], r[f"weight_{term}"]) for r in train if f"weight_{term}" in r]
        if points:
            ax.plot(*zip(*points), label=term)
    ax.set(title="objective weights (configured × curriculum × balancing)", xlabel="step")
    if objectives:
        ax.legend()
    ax = axes[2]
    for term in ("loss", *objectives):
        points = [(r["step"], r["loss"][term]) for r in evals if term in r.get("loss", {})]
        if points:
            ax.plot(*zip(*points), marker="o", label=f"val {term}")
    ax.set(title="val loss", xlabel="step", yscale="log")
    if evals:
        ax.legend()
    ax = axes[3]
    for method in METHODS:
        for key, style in (("t2i_r10", "-"), ("t2i_r1", ":"), ("i2t_r10", "--")):
            points = [(r["step"], r[method][key]) for r in evals if method in r]
            if points:
                ax.plot(*zip(*points), style, marker="o", label=f"{method} {key}")
    ax.set(title="val retrieval", xlabel="step", ylim=(0, 1))
    if evals:
        ax.legend(fontsize=7)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="PNG path (default: RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    try:
        out = plot(args.run_dir, args.out or args.run_dir / "metrics.png")
    except FileNotFoundError as err:
        print(f"plot_run: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

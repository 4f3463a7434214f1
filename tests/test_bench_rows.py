"""The throughput benchmarks time what their rows name: a row with an objective in it times
steps in which that objective runs, whatever curriculum the recipe gives it."""
from pathlib import Path

import pytest

from shard_sets import load_tool
from vlp.config import load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("row", ["itc+filip+itm", "all", "all-demo", "all+ckpt", "all+negatives", "all+frozen-text",
                                 "all-fp32", "all-2ranks"])
def test_train_bench_rows_time_steps_in_which_their_objectives_have_joined(row):
    _, overrides = load_tool("bench_train").SETTINGS[row]
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    running = {name: o for name, o in cfg.loss.objectives.items() if o.weight > 0}
    named = {"itc", "filip", "itm"} if row == "itc+filip+itm" else {"itc", "filip", "itm", "lm"}
    assert set(running) == named
    assert all(o.start == 0 for o in running.values()), {n: o.start for n, o in running.items()}


def test_the_negatives_row_differs_from_all_only_by_the_caption_negatives():
    settings = load_tool("bench_train").SETTINGS
    plain = load_config(ROOT / "configs" / "demo.yaml", settings["all"][1])
    negatives = load_config(ROOT / "configs" / "demo.yaml", settings["all+negatives"][1])
    assert plain.loss.text_negatives.fraction == 0
    assert negatives.loss.text_negatives.fraction > 0
    negatives.loss.text_negatives.fraction = 0
    assert negatives == plain

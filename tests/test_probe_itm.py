"""tools/probe_itm.py: ITM trained alone on frozen towers, measured before and after."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

from test_retrieval_support import tiny_model_dir, tiny_shards

_spec = importlib.util.spec_from_file_location("probe_itm", Path(__file__).resolve().parent.parent / "tools/probe_itm.py")
probe_itm = importlib.util.module_from_spec(_spec)
sys.modules["probe_itm"] = probe_itm  # its dataclass looks its module up there
_spec.loader.exec_module(probe_itm)


def test_the_probe_trains_only_the_fusion_layers_and_reports_both_sides(tmp_path, capsys):
    model_dir = tiny_model_dir()
    shards = "::".join(tiny_shards(corrupt=False))
    args = ["--model", str(model_dir), "--train", shards, "--val", shards, "--steps", "4",
            "--batch", "8", "--k", "4", "--text-negatives", "1.0", "--out", str(tmp_path)]
    assert probe_itm.main(args) == 0
    result = json.loads((tmp_path / "probe.json").read_text())
    last_line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last_line == {"before": result["before"], "after": result["after"]}
    # The towers are frozen: ITC ranks alike before and after; ITM's scores moved.
    assert result["after"]["itc"] == result["before"]["itc"]
    assert set(result["after"]) == {"itc", "itm_only", "rerank"}
    assert all(0.0 <= v <= 1.0 for v in result["after"].values())
    assert len(result["loss_every_10"]) == 1


def test_a_probe_step_changes_the_fusion_layers_and_nothing_else():
    model, cfg, tokenizer = probe_itm.load_model_dir(tiny_model_dir())
    shards = "::".join(tiny_shards(corrupt=False))
    cache = probe_itm.cache_split(model, cfg, tokenizer, shards)
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    probe_itm.reset_fusion(model, seed=0)
    args = probe_itm.parse_args(["--model", "x", "--steps", "2", "--batch", "8", "--text-negatives", "0.5"])
    losses = probe_itm.train_probe(model, cache, args)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("text.fusion.", "itm_head.")) for k in changed), changed

"""The full model on two gloo ranks: every objective runs with global negatives and ranks
whose captions trim to different lengths; ITC/FILIP match the single-process batch."""
from __future__ import annotations


import torch

from gloo_ranks import run_ranks
from test_model import tiny_batch, tiny_cfg

WORLD = 2


def make_model():
    from vlp.model import build_model

    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg.loss.filip.token_fraction = 1.0
    return build_model(cfg).eval()


def global_batch():
    batch = tiny_batch(b=6, length=9, seed=4)
    batch["attention_mask"][3:, 5:] = 0  # rank 1's captions are all short
    batch["input_ids"] = batch["input_ids"] * batch["attention_mask"]
    batch["image_id"] = torch.tensor([0, 1, 2, 2, 4, 5])  # a duplicate image across ranks
    return batch


def _rank_main(rank: int) -> dict:
    torch.set_num_threads(1)
    import vlp.losses.matching as matching

    draws = []
    sample = matching.sample_hard_negatives

    def spy(logits, forbidden, *args, **kwargs):
        index, valid = sample(logits, forbidden, *args, **kwargs)
        draws.append((forbidden, index, valid))
        return index, valid

    matching.sample_hard_negatives = spy
    model = make_model()
    local = {k: v[rank * 3:(rank + 1) * 3] for k, v in global_batch().items()}
    torch.manual_seed(rank)
    out = model(local)
    out["loss"].backward()
    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    result = {k: float(out[k]) for k in ("itc", "filip", "itm", "lm", "loss")}
    result["grads_finite"] = grads_finite
    result["candidates"] = [tuple(forbidden.shape) for forbidden, _, _ in draws]
    result["picked_forbidden"] = any(bool(f[torch.arange(3), i][v].any()) for f, i, v in draws)
    # Image id 2 sits on both ranks (global rows 2 and 3): each must mask the other's copy.
    result["duplicate_masked"] = bool(draws[0][0][2 if rank == 0 else 0, 2] and draws[0][0][2 if rank == 0 else 0, 3])
    return result


def test_model_on_two_ranks(tmp_path):
    ranks = run_ranks(_rank_main, tmp_path, WORLD)
    assert all(r["grads_finite"] for r in ranks)
    for r in ranks:  # negatives come from the global batch, never a same-image pair
        assert r["candidates"] == [[3, 6], [3, 6]]
        assert not r["picked_forbidden"] and r["duplicate_masked"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in ranks)
    with torch.no_grad():
        single = make_model()(global_batch())
    for name in ("itc", "filip"):
        assert abs(sum(r[name] for r in ranks) / WORLD - single[name].item()) < 1e-4, name

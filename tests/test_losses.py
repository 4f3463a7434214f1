"""Each objective against a direct loop reference, plus the properties the design relies on."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlp.config import LossConfig
from vlp.errors import ConfigError
from vlp.losses import (IGNORE, ITC, Filip, caption_loss, contrastive_loss, filip_loss, sigmoid_loss,
                        filip_similarity, itm_loss, lm_targets, sample_hard_negatives, select_tokens)


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).float()


def ce_row(logits_row, target):
    return -(logits_row[target] - torch.logsumexp(logits_row, 0))


# ------------------------------------------------------------------ ITC

def test_itc_matches_loop_reference():
    img, txt, scale = unit(6, 8, seed=1), unit(6, 8, seed=2), torch.tensor(12.5)
    out = contrastive_loss(img, txt, scale)
    rows = []
    for i in range(6):
        i2t = torch.stack([scale * torch.dot(img[i], txt[j]) for j in range(6)])
        t2i = torch.stack([scale * torch.dot(txt[i], img[j]) for j in range(6)])
        rows.append(0.5 * (ce_row(i2t, i) + ce_row(t2i, i)))
    assert out["loss"].item() == pytest.approx(torch.stack(rows).mean().item(), abs=1e-5)


def test_itc_with_hard_negative_columns_matches_loop_reference():
    img, txt, neg, scale = unit(4, 8, seed=21), unit(4, 8, seed=22), unit(3, 8, seed=23), torch.tensor(8.0)
    out = contrastive_loss(img, txt, scale, negative_emb=neg)
    rows = []
    for i in range(4):
        i2t = torch.stack([scale * torch.dot(img[i], t) for t in list(txt) + list(neg)])  # negatives: columns
        t2i = torch.stack([scale * torch.dot(txt[i], img[j]) for j in range(4)])          # ...never rows
        rows.append(0.5 * (ce_row(i2t, i) + ce_row(t2i, i)))
    assert out["loss"].item() == pytest.approx(torch.stack(rows).mean().item(), abs=1e-5)


def test_itc_drop_hardest_leaves_the_highest_loss_pairs_out_of_the_mean():
    img, txt, scale = unit(8, 8, seed=31), unit(8, 8, seed=32), torch.tensor(10.0)
    rows = []
    for i in range(8):
        i2t = torch.stack([scale * torch.dot(img[i], txt[j]) for j in range(8)])
        t2i = torch.stack([scale * torch.dot(txt[i], img[j]) for j in range(8)])
        rows.append((0.5 * (ce_row(i2t, i) + ce_row(t2i, i))).item())
    kept = sorted(rows)[:6]  # a quarter of 8 pairs: the two worst are left out
    out = contrastive_loss(img, txt, scale, drop_hardest=0.25)
    assert out["loss"].item() == pytest.approx(sum(kept) / 6, abs=1e-5)
    assert out["loss"].item() < sum(rows) / 8


def test_itc_dropped_pairs_still_serve_as_negatives():
    img, txt = unit(8, 8, seed=33).requires_grad_(), unit(8, 8, seed=34).requires_grad_()
    contrastive_loss(img, txt, torch.tensor(10.0), drop_hardest=0.5)["loss"].backward()
    # every caption is a column of the kept rows: each gets a gradient, dropped or not
    assert (txt.grad.norm(dim=1) > 0).all() and (img.grad.norm(dim=1) > 0).all()


def test_itc_drop_share_ramps_with_progress_and_is_off_in_eval():
    itc = ITC(ITC.Options(drop_hardest=0.4, drop_ramp=0.5), LossConfig())
    shares = []
    for progress in (0.0, 0.25, 0.5, 0.9):
        itc.set_progress(0, progress)
        shares.append(itc.drop_share)
    assert shares == pytest.approx([0.0, 0.2, 0.4, 0.4])

    class Batch:
        image_emb, text_emb, negative_text_emb = unit(10, 8, seed=35), unit(10, 8, seed=36), None
    assert itc.train()(Batch)["loss"] < itc.eval()(Batch)["loss"]  # eval: every pair counts


def test_itc_drop_share_outside_0_1_is_a_config_error():
    with pytest.raises(ConfigError, match="loss.itc.drop_hardest"):
        ITC(ITC.Options(drop_hardest=1.0), LossConfig())
    with pytest.raises(ConfigError, match="loss.itc.drop_ramp"):
        ITC(ITC.Options(drop_hardest=0.3, drop_ramp=-0.1), LossConfig())


# ------------------------------------------------------------------ SigLIP

def test_sigmoid_loss_matches_loop_reference():
    img, txt = unit(5, 8, seed=13), unit(5, 8, seed=14)
    scale, bias = torch.tensor(10.0), torch.tensor(-4.0)
    out = sigmoid_loss(img, txt, scale, bias)
    total = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if i == j else -1.0
            total += -math.log(1 / (1 + math.exp(-z * (scale * torch.dot(img[i], txt[j]) + bias).item())))
    assert out["loss"].item() == pytest.approx(total / 5, rel=1e-5)


def test_siglip_objective_starts_at_log_10_and_the_prior_log_odds_of_its_batch():
    from vlp.config import load_config
    from vlp.losses import SigLIP

    cfg = load_config(overrides=["loss.siglip=1"])
    objective = SigLIP(cfg.loss.siglip, cfg.loss)
    objective.start_training(global_batch_size=64)
    assert objective.logit_scale().item() == pytest.approx(10.0)
    assert objective.bias.item() == pytest.approx(-math.log(63))  # sigmoid(bias) = 1/64
    fixed = SigLIP(load_config(overrides=["loss.siglip=1", "loss.siglip.init_bias=-10"]).loss.siglip, cfg.loss)
    fixed.start_training(global_batch_size=64)
    assert fixed.bias.item() == -10.0  # the paper's value, when asked for


# ------------------------------------------------------------------ FILIP

def filip_reference(img_tok, txt_tok, mask):
    """Scores straight from the paper's definition, one pair at a time."""
    bi, bt = img_tok.shape[0], txt_tok.shape[0]
    i2t, t2i = torch.zeros(bi, bt), torch.zeros(bi, bt)
    for i in range(bi):
        for t in range(bt):
            real = [q for q in range(txt_tok.shape[1]) if mask[t, q]]
            sim = [[torch.dot(img_tok[i, p], txt_tok[t, q]).item() for q in real]
                   for p in range(img_tok.shape[1])]
            i2t[i, t] = sum(max(row) for row in sim) / len(sim)
            t2i[i, t] = sum(max(sim[p][k] for p in range(len(sim))) for k in range(len(real))) / len(real)
    return i2t, t2i


def random_mask(b, length, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (b,), generator=g)
    return (torch.arange(length)[None] < lengths[:, None]).long()


def test_filip_similarity_matches_loop_reference_and_is_not_a_transpose():
    img, txt, mask = unit(3, 5, 8, seed=3), unit(4, 6, 8, seed=4), random_mask(4, 6, seed=5)
    i2t, t2i = filip_similarity(img, txt, mask, chunk=3)
    ref_i2t, ref_t2i = filip_reference(img, txt, mask)
    torch.testing.assert_close(i2t, ref_i2t, atol=1e-5, rtol=0)
    torch.testing.assert_close(t2i, ref_t2i, atol=1e-5, rtol=0)
    assert not torch.allclose(i2t, t2i, atol=1e-3)


def test_filip_loss_matches_loop_reference():
    img, txt, mask = unit(4, 5, 8, seed=6), unit(4, 6, 8, seed=7), random_mask(4, 6, seed=8)
    scale = torch.tensor(9.0)
    out = filip_loss(img, txt, mask, scale, chunk=2)
    ref_i2t, ref_t2i = filip_reference(img, txt, mask)
    ref = torch.stack([0.5 * (ce_row(scale * ref_i2t[i], i) + ce_row(scale * ref_t2i[:, i], i))
                       for i in range(4)]).mean()
    assert out["loss"].item() == pytest.approx(ref.item(), abs=1e-5)


def test_filip_with_hard_negative_columns_matches_loop_reference():
    img, txt, mask = unit(3, 5, 8, seed=24), unit(3, 6, 8, seed=25), random_mask(3, 6, seed=26)
    neg, neg_mask = unit(2, 4, 8, seed=27), random_mask(2, 4, seed=28)
    scale = torch.tensor(9.0)
    out = filip_loss(img, txt, mask, scale, chunk=2, negatives=(neg, neg_mask))
    ref_i2t, ref_t2i = filip_reference(img, txt, mask)
    neg_i2t, _ = filip_reference(img, neg, neg_mask)
    ref = torch.stack([0.5 * (ce_row(scale * torch.cat([ref_i2t[i], neg_i2t[i]]), i) + ce_row(scale * ref_t2i[:, i], i))
                       for i in range(3)]).mean()
    assert out["loss"].item() == pytest.approx(ref.item(), abs=1e-5)


def test_filip_is_invariant_to_padding():
    img, txt, mask = unit(3, 5, 8, seed=9), unit(3, 4, 8, seed=10), random_mask(3, 4, seed=11)
    # Pad tokens with large garbage values: they must never win a max or enter a mean.
    padded_txt = torch.cat([txt, 5 * unit(3, 3, 8, seed=12)], 1)
    padded_mask = torch.cat([mask, torch.zeros(3, 3, dtype=torch.long)], 1)
    scale = torch.tensor(10.0)
    for a, b in zip(filip_similarity(img, txt, mask), filip_similarity(img, padded_txt, padded_mask)):
        torch.testing.assert_close(a, b)
    assert filip_loss(img, txt, mask, scale)["loss"].item() == pytest.approx(
        filip_loss(img, padded_txt, padded_mask, scale)["loss"].item(), abs=1e-6)


def test_filip_chunking_and_precision():
    img, txt, mask = unit(5, 6, 16, seed=13), unit(7, 5, 16, seed=14), random_mask(7, 5, seed=15)
    whole = filip_similarity(img, txt, mask, chunk=100)
    for a, b in zip(whole, filip_similarity(img, txt, mask, chunk=2)):
        torch.testing.assert_close(a, b)
    for a, b in zip(whole, filip_similarity(img, txt, mask, chunk=3, dtype=torch.bfloat16)):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=0)


def test_filip_precision_auto_follows_the_precision_the_run_stores_weights_in():
    auto, fixed = (Filip(Filip.Options(precision=p), LossConfig()) for p in ("auto", "fp32"))
    assert auto.similarity_dtype() == torch.float32
    assert auto.to(torch.bfloat16).similarity_dtype() == torch.bfloat16  # as DeepSpeed's bf16 does
    assert fixed.to(torch.bfloat16).similarity_dtype() == torch.float32


def test_filip_token_selection_keeps_the_best_matching_tokens():
    img, txt, mask = unit(3, 8, 8, seed=16), unit(3, 6, 8, seed=17), random_mask(3, 6, seed=18)
    image_index, text_index, kept_mask = select_tokens(img, txt, mask, 0.25, chunk=2)
    assert image_index.shape == (3, 2) and text_index.shape == (3, 2)
    for i in range(3):
        best = [max(torch.dot(img[i, p], txt[t, q]).item() for t in range(3) for q in range(6) if mask[t, q])
                for p in range(8)]
        assert set(image_index[i].tolist()) == set(sorted(range(8), key=lambda p: -best[p])[:2])
    for t in range(3):
        real = [q for q in range(6) if mask[t, q]]
        best = {q: max(torch.dot(img[i, p], txt[t, q]).item() for i in range(3) for p in range(8)) for q in real}
        top = sorted(real, key=lambda q: -best[q])[:2]
        assert set(text_index[t].tolist()[:len(top)]) == set(top)
        assert kept_mask[t].sum().item() == len(top)
    scale = torch.tensor(10.0)
    assert filip_loss(img, txt, mask, scale, token_fraction=1.0)["loss"].item() == pytest.approx(
        filip_loss(img, txt, mask, scale)["loss"].item())
    assert torch.isfinite(filip_loss(img, txt, mask, scale, token_fraction=0.25)["loss"])


# ------------------------------------------------------------------ ITM

def test_hard_negatives_never_positive_or_same_image_across_seeds():
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4])
    forbidden = ids[:, None] == ids[None, :]
    logits = 20 * unit(8, 4, seed=19) @ unit(8, 4, seed=20).t()
    logits = logits + 50 * torch.eye(8)  # positives look the most attractive
    for seed in range(200):
        index, valid = sample_hard_negatives(logits, forbidden, torch.Generator().manual_seed(seed))
        assert valid.all()
        assert not forbidden[torch.arange(8), index].any()


def test_hard_negatives_follow_softmax_of_similarities():
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5]]).repeat(40000, 1)
    forbidden = torch.zeros_like(logits, dtype=torch.bool)
    forbidden[:, 0] = True
    index, _ = sample_hard_negatives(logits, forbidden, torch.Generator().manual_seed(0))
    freq = torch.bincount(index, minlength=4).float() / len(index)
    expected = torch.tensor([0.0, *torch.tensor([1.0, 2.0, 0.5]).softmax(0).tolist()])
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)


@pytest.mark.parametrize("ids", [[7], [3, 5], [4, 4]])
def test_hard_negatives_at_tiny_batches_and_peaked_logits(ids):
    ids = torch.tensor(ids)
    forbidden = ids[:, None] == ids[None, :]
    logits = torch.full((len(ids), len(ids)), -1e4)
    logits[:, 0] = 1e4  # extremely peaked, still NaN-free
    index, valid = sample_hard_negatives(logits, forbidden)
    expected_valid = (~forbidden).any(1)
    assert torch.equal(valid, expected_valid)
    assert not forbidden[torch.arange(len(ids))[valid], index[valid]].any()
    out = itm_loss(torch.randn(3 * len(ids), 2), torch.tensor([1] * len(ids) + [0] * 2 * len(ids)),
                   torch.cat([torch.ones(len(ids), dtype=torch.bool), valid, valid]))
    assert torch.isfinite(out["loss"])


def test_itm_loss_matches_loop_reference():
    logits = torch.randn(6, 2, generator=torch.Generator().manual_seed(21))
    labels = torch.tensor([1, 1, 0, 0, 0, 0])
    valid = torch.tensor([True, True, True, False, True, False])
    ref = [ce_row(logits[i], labels[i]) for i in range(6) if valid[i]]
    assert itm_loss(logits, labels, valid)["loss"].item() == pytest.approx(
        torch.stack(ref).mean().item(), abs=1e-5)


# ------------------------------------------------------------------ LM

def test_lm_targets_shift_and_ignore_pads():
    ids = torch.tensor([[101, 7, 8, 102, 0], [101, 9, 102, 0, 0]])
    mask = (ids != 0).long()
    assert lm_targets(ids, mask).tolist() == [[7, 8, 102, IGNORE, IGNORE], [9, 102, IGNORE, IGNORE, IGNORE]]


def test_caption_loss_matches_loop_reference_with_label_smoothing():
    g = torch.Generator().manual_seed(22)
    logits = torch.randn(2, 4, 10, generator=g)
    targets = torch.tensor([[3, 5, IGNORE, IGNORE], [1, IGNORE, 9, 0]])
    eps, terms = 0.1, []
    for b in range(2):
        for t in range(4):
            if targets[b, t] == IGNORE:
                continue
            logp = logits[b, t] - torch.logsumexp(logits[b, t], 0)
            terms.append(-(1 - eps) * logp[targets[b, t]] - eps * logp.mean())
    ref = torch.stack(terms).mean()
    assert caption_loss(logits, targets, 0.1)["loss"].item() == pytest.approx(ref.item(), abs=1e-5)


# ------------------------------------------------------------------ weighting

def test_filip_backward_does_not_keep_the_full_token_similarity():
    """Autograd may save the tokens and per-pair argmax indices, never B_i·B_t·P·Q values."""
    img = unit(8, 16, 8, seed=23).requires_grad_(True)
    txt = unit(8, 12, 8, seed=24).requires_grad_(True)
    mask = random_mask(8, 12, seed=25)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        i2t, t2i = filip_similarity(img, txt, mask, chunk=2)
    (i2t.sum() + t2i.sum()).backward()
    full = 8 * 8 * 16 * 12
    assert max(saved) < full / 4 and sum(saved) < full
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0

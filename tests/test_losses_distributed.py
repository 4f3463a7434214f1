"""ITC, sigmoid ITC (SigLIP) and FILIP on two gloo ranks equal the single-process loss on
the concatenated batch, and so do their gradients (after the 1/world averaging DDP/DeepSpeed
apply)."""
from __future__ import annotations


import torch
import torch.nn.functional as F

from gloo_ranks import run_ranks
from vlp.losses import contrastive_loss, filip_loss, sigmoid_loss

B_LOCAL, WORLD = 3, 2


NEGATIVES = (2, 1)  # hard negative captions per rank: ranks hold different numbers


def global_inputs():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(B_LOCAL * WORLD, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(B_LOCAL * WORLD, 8, generator=g), dim=-1)
    img_tok = F.normalize(torch.randn(B_LOCAL * WORLD, 4, 8, generator=g), dim=-1)
    txt_tok = F.normalize(torch.randn(B_LOCAL * WORLD, 5, 8, generator=g), dim=-1)
    lengths = torch.randint(1, 6, (B_LOCAL * WORLD,), generator=g)
    mask = (torch.arange(5)[None] < lengths[:, None]).long()
    neg = F.normalize(torch.randn(sum(NEGATIVES), 8, generator=g), dim=-1)
    neg_tok = F.normalize(torch.randn(sum(NEGATIVES), 5, 8, generator=g), dim=-1)
    neg_mask = (torch.arange(5)[None] < torch.tensor([[3], [5], [2]])).long()
    return img, txt, img_tok, txt_tok, mask, neg, neg_tok, neg_mask


def losses_and_grads(img, txt, img_tok, txt_tok, mask, neg, neg_tok, neg_mask):
    leaves = [t.clone().requires_grad_(True) for t in (img, txt, img_tok, txt_tok, neg, neg_tok)]
    scale = torch.tensor(10.0)
    itc = contrastive_loss(leaves[0], leaves[1], scale)["loss"]
    siglip = sigmoid_loss(leaves[0], leaves[1], scale, torch.tensor(-3.0))["loss"]
    # Rank 1 trims its texts to its own longest caption, as the model does: lengths differ.
    length = int(mask.sum(1).max())
    filip = filip_loss(leaves[2], leaves[3][:, :length], mask[:, :length], scale, chunk=2)["loss"]
    # The same with hard negative captions as extra columns.
    itc_neg = contrastive_loss(leaves[0], leaves[1], scale, negative_emb=leaves[4])["loss"]
    siglip_neg = sigmoid_loss(leaves[0], leaves[1], scale, torch.tensor(-3.0), negative_emb=leaves[4])["loss"]
    neg_length = int(neg_mask.sum(1).max())
    filip_neg = filip_loss(leaves[2], leaves[3][:, :length], mask[:, :length], scale, chunk=2,
                           negatives=(leaves[5][:, :neg_length], neg_mask[:, :neg_length]))["loss"]
    total = itc + siglip + filip + itc_neg + siglip_neg + filip_neg
    total.backward()
    losses = {"itc": itc, "siglip": siglip, "filip": filip, "itc_neg": itc_neg, "siglip_neg": siglip_neg,
              "filip_neg": filip_neg}
    return {k: v.item() for k, v in losses.items()}, [leaf.grad for leaf in leaves]


def _rank_losses(rank: int) -> dict:
    torch.set_num_threads(1)
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    negatives = slice(sum(NEGATIVES[:rank]), sum(NEGATIVES[:rank + 1]))
    inputs = global_inputs()
    losses, grads = losses_and_grads(*(t[rows] for t in inputs[:5]), *(t[negatives] for t in inputs[5:]))
    return {**losses, "grads": [g.tolist() for g in grads]}


def test_two_ranks_equal_the_concatenated_batch(tmp_path):
    ranks = run_ranks(_rank_losses, tmp_path, WORLD)
    losses, grads = losses_and_grads(*global_inputs())
    # Each rank's loss is the mean over its rows (SigLIP: the sum over its images' rows over
    # the local batch size); their mean is the global one.
    for name, single in losses.items():
        assert abs(sum(r[name] for r in ranks) / WORLD - single) < 1e-5, name
    for i, single in enumerate(grads):
        gathered = torch.cat([torch.tensor(r["grads"][i]) for r in ranks]) / WORLD
        torch.testing.assert_close(gathered, single, atol=1e-6, rtol=1e-5)
    assert losses["itc_neg"] > losses["itc"] and losses["filip_neg"] > losses["filip"]  # harder

"""Every scorer's scores of the (image, caption) pairs inside each foil test.

- itc:    cosine of the global embeddings.
- filip:  FILIP token-wise similarity; image→text ranks a test's captions, text→image its
          images (the directions retrieval eval uses for i2t and t2i).
- itm:    the matching head's probability, the towers' states computed once per batch.
- rerank: `vlp.metrics.rerank_score` of ITC and ITM, what retrieval ranks by.
"""
from __future__ import annotations

import torch

from vlp.metrics import rerank_score
from vlp.model.scoring import itm_pair_scores
from vlp.padding import trim_padding

SCORERS = ("itc", "filip", "itm", "rerank")
# One test's rows (its images, true first) and columns (its captions, true first) in a batch.
Test = tuple[list[int], list[int]]
# Per scorer: (scores that rank captions, scores that rank images), [n_images, n_captions].
Matrices = dict[str, tuple[torch.Tensor, torch.Tensor]]


def scorers_of(model) -> tuple[str, ...]:
    """The scorers the model has heads for."""
    lacking = set()
    if not model.has_filip:
        lacking.add("filip")
    if not model.has_itm:
        lacking |= {"itm", "rerank"}
    return tuple(s for s in SCORERS if s not in lacking)


@torch.no_grad()
def score_tests(model, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                tests: list[Test], *, device="cpu", dtype=torch.float32,
                pair_batch: int = 256) -> list[Matrices]:
    """Each tower runs once over the batch's images and captions; every score comes from
    those states."""
    scorers = scorers_of(model)
    ids, mask = trim_padding(ids.to(device), mask.to(device))
    states = model.encode_image_states(images.to(device=device, dtype=dtype))
    text_states = model.encode_text_states(ids, mask)
    image_emb = model.encode_image(image_states=states).float()
    text_emb = model.encode_text(attention_mask=mask, text_states=text_states).float()
    itc = (image_emb @ text_emb.t()).cpu()
    full = {"itc": (itc, itc)}
    if "itm" in scorers:
        pair_image = torch.tensor([i for rows, cols in tests for i in rows for _ in cols])
        pair_caption = torch.tensor([t for rows, cols in tests for _ in rows for t in cols])
        itm = torch.full_like(itc, float("nan"))  # pairs outside a test are never scored
        itm[pair_image, pair_caption] = itm_pair_scores(model, states, text_states, mask,
                                                        pair_image, pair_caption, pair_batch)
        combined = rerank_score(itc, itm, float(model.logit_scale))
        full.update(itm=(itm, itm), rerank=(combined, combined))
    out = [{name: (a[rows][:, cols], b[rows][:, cols]) for name, (a, b) in full.items()}
           for rows, cols in tests]
    if "filip" in scorers:
        image_tokens = model.encode_image_tokens(image_states=states)
        text_tokens = model.encode_text_tokens(attention_mask=mask, text_states=text_states)
        for matrices, (rows, cols) in zip(out, tests):
            # Per test: the full batch matrix would cost batch-size times more.
            i2t, t2i = model.filip_scores(image_tokens[rows], text_tokens[cols], mask[cols])
            matrices["filip"] = (i2t.float().cpu(), t2i.float().cpu())
    return [{name: m[name] for name in scorers} for m in out]

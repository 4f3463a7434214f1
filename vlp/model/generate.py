"""Caption generation over a CaptionDecoder: greedy, beam search, nucleus sampling.

Batched; every sequence starts with [DEC] and stops at [SEP] (later positions are pad).
No KV cache: captions are short, and recomputing the prefix keeps this loop small.
"""
from __future__ import annotations

import torch

from vlp.model.decoder import CaptionDecoder


def _next_logprobs(decoder: CaptionDecoder, tokens: torch.Tensor, image_states: torch.Tensor,
                    pad_id: int) -> torch.Tensor:
    logits = decoder(tokens, torch.ones_like(tokens), image_states)[:, -1].float()
    logits[:, decoder.dec_token_id] = float("-inf")  # never emit the bos again
    logits[:, pad_id] = float("-inf")  # pad only ever follows [SEP]
    return logits.log_softmax(-1)


def _finish(tokens: torch.Tensor, sep_id: int, pad_id: int) -> torch.Tensor:
    """Drop the bos; everything after the first [SEP] becomes pad."""
    out = tokens[:, 1:]
    after_sep = (out == sep_id).long().cumsum(1) - (out == sep_id).long() > 0
    out = out.masked_fill(after_sep, pad_id)
    length = int((out != pad_id).any(0).nonzero().max()) + 1 if (out != pad_id).any() else 1
    return out[:, :length]


@torch.no_grad()
def generate_ids(decoder: CaptionDecoder, image_states: torch.Tensor, sep_id: int, pad_id: int,
                 method: str = "beam", max_new_tokens: int = 20, num_beams: int = 3,
                 top_p: float = 0.9, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids `[B, T]`, T ≤ max_new_tokens, ending in [SEP] then pad (no bos)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_beams < 1 or not 0.0 < top_p <= 1.0 or temperature <= 0.0:
        raise ValueError(f"need num_beams >= 1, 0 < top_p <= 1, temperature > 0; got "
                         f"{num_beams}, {top_p}, {temperature}")
    if method == "beam":
        return _beam(decoder, image_states, sep_id, pad_id, max_new_tokens, num_beams)
    if method not in ("greedy", "nucleus"):
        raise ValueError(f"generation method must be greedy, beam or nucleus, got {method!r}")
    batch = image_states.shape[0]
    tokens = torch.full((batch, 1), decoder.dec_token_id, dtype=torch.long, device=image_states.device)
    done = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    for _ in range(max_new_tokens):
        logprobs = _next_logprobs(decoder, tokens, image_states, pad_id)
        if method == "greedy":
            nxt = logprobs.argmax(-1)
        else:
            nxt = _sample_nucleus(logprobs / temperature, top_p, generator)
        nxt = nxt.masked_fill(done, pad_id)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        done |= nxt == sep_id
        if done.all():
            break
    return _finish(tokens, sep_id, pad_id)


def _sample_nucleus(logits: torch.Tensor, top_p: float, generator) -> torch.Tensor:
    probs = logits.softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(1, choice)[:, 0]


def _beam(decoder, image_states, sep_id, pad_id, max_new_tokens, num_beams) -> torch.Tensor:
    batch, device = image_states.shape[0], image_states.device
    states = image_states.repeat_interleave(num_beams, 0)
    tokens = torch.full((batch * num_beams, 1), decoder.dec_token_id, dtype=torch.long, device=device)
    # All beams start identical: only the first may expand at step one.
    scores = torch.full((batch, num_beams), float("-inf"), device=device)
    scores[:, 0] = 0.0
    done = torch.zeros(batch * num_beams, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch * num_beams, device=device)
    for _ in range(max_new_tokens):
        logprobs = _next_logprobs(decoder, tokens, states, pad_id)
        # A finished beam may only continue with pad, at no cost, so it keeps its score.
        frozen = torch.full_like(logprobs, float("-inf"))
        frozen[:, pad_id] = 0.0
        logprobs = torch.where(done[:, None], frozen, logprobs)
        vocab = logprobs.shape[1]
        total = (scores.reshape(-1, 1) + logprobs).reshape(batch, num_beams * vocab)
        scores, flat = total.topk(num_beams, dim=1)
        source = (flat // vocab + torch.arange(batch, device=device)[:, None] * num_beams).reshape(-1)
        nxt = (flat % vocab).reshape(-1)
        tokens = torch.cat([tokens[source], nxt[:, None]], 1)
        lengths = lengths[source] + (~done[source]).float()
        done = done[source] | (nxt == sep_id)
        if done.all():
            break
    # Length-normalized choice among the beams of each image.
    best = (scores.reshape(-1) / lengths.clamp(min=1)).reshape(batch, num_beams).argmax(1)
    chosen = tokens.reshape(batch, num_beams, -1)[torch.arange(batch, device=device), best]
    return _finish(chosen, sep_id, pad_id)

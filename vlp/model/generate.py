"""Caption generation over a CaptionDecoder: greedy, beam search, nucleus sampling.

Batched; every sequence starts with [DEC] and stops at [SEP] (later positions are pad).
Each step feeds only the newest token through the decoder's key/value cache; `cache=False`
runs the whole prefix again at every step instead (the reference the cache is tested and
timed against: tools/bench_caption.py).
"""
from __future__ import annotations

import torch

from vlp.model.decoder import CaptionDecoder


class _NextToken:
    """Log-probs of each row's next token, given its tokens so far `[B, t]`."""

    def __init__(self, decoder: CaptionDecoder, image_states: torch.Tensor, pad_id: int,
                 max_new_tokens: int, cache: bool):
        self.decoder, self.image_states, self.pad_id = decoder, image_states, pad_id
        self.cache = decoder.start_cache(image_states, max_new_tokens + 1) if cache else None

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            logits = self.decoder.step(tokens[:, -1], self.cache).float()
        else:
            logits = self.decoder(tokens, torch.ones_like(tokens), self.image_states)[:, -1].float()
        logits[:, self.decoder.dec_token_id] = float("-inf")  # never emit the bos again
        logits[:, self.pad_id] = float("-inf")  # pad only ever follows [SEP]
        return logits.log_softmax(-1)

    def reorder(self, rows: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(rows)


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
                 generator: torch.Generator | None = None, cache: bool = True) -> torch.Tensor:
    """Token ids `[B, T]`, T ≤ max_new_tokens, ending in [SEP] then pad (no bos)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_beams < 1 or not 0.0 < top_p <= 1.0 or temperature <= 0.0:
        raise ValueError(f"need num_beams >= 1, 0 < top_p <= 1, temperature > 0; got "
                         f"{num_beams}, {top_p}, {temperature}")
    if method == "beam":
        return _beam(decoder, image_states, sep_id, pad_id, max_new_tokens, num_beams, cache)
    if method not in ("greedy", "nucleus"):
        raise ValueError(f"generation method must be greedy, beam or nucleus, got {method!r}")
    batch = image_states.shape[0]
    tokens = torch.full((batch, 1), decoder.dec_token_id, dtype=torch.long, device=image_states.device)
    done = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    next_token = _NextToken(decoder, image_states, pad_id, max_new_tokens, cache)
    for _ in range(max_new_tokens):
        logprobs = next_token(tokens)
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
    # The nucleus lies among the most likely tokens: sort only the top k, growing k until
    # they hold top_p of the mass in every row (a trained decoder needs a few dozen; sorting
    # the whole vocabulary at every step cost more than the decoder step itself).
    k = min(64, probs.shape[1])
    sorted_probs, order = probs.topk(k, dim=-1)
    while k < probs.shape[1] and (sorted_probs.sum(-1) < top_p).any():
        k = min(4 * k, probs.shape[1])
        sorted_probs, order = probs.topk(k, dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(1, choice)[:, 0]


def _beam(decoder, image_states, sep_id, pad_id, max_new_tokens, num_beams, cache) -> torch.Tensor:
    batch, device = image_states.shape[0], image_states.device
    states = image_states.repeat_interleave(num_beams, 0)
    tokens = torch.full((batch * num_beams, 1), decoder.dec_token_id, dtype=torch.long, device=device)
    # All beams start identical: only the first may expand at step one.
    scores = torch.full((batch, num_beams), float("-inf"), device=device)
    scores[:, 0] = 0.0
    done = torch.zeros(batch * num_beams, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch * num_beams, device=device)
    next_token = _NextToken(decoder, states, pad_id, max_new_tokens, cache)
    for _ in range(max_new_tokens):
        logprobs = next_token(tokens)
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
        next_token.reorder(source)
        lengths = lengths[source] + (~done[source]).float()
        done = done[source] | (nxt == sep_id)
        if done.all():
            break
    # Length-normalized choice among the beams of each image.
    best = (scores.reshape(-1) / lengths.clamp(min=1)).reshape(batch, num_beams).argmax(1)
    chosen = tokens.reshape(batch, num_beams, -1)[torch.arange(batch, device=device), best]
    return _finish(chosen, sep_id, pad_id)

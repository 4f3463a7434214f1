"""Zero-shot classifier over the VLP model API: class embeddings and three scorings.

- itc:   cosine of the image embedding with each class embedding, where a class embedding
         is the renormalized mean of its normalized prompt embeddings (CLIP's ensemble).
- filip: FILIP image->text token-wise late interaction between the image patches and each
         prompt's tokens, averaged over the prompts of a class.
- itm:   itc, then the matching head rescores each image's top-k classes (averaged over
         templates); the top-k's ITC probability mass is shared out by the ITM scores.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vlp.zeroshot.errors import ZeroShotError
from vlp.atomic import atomic_write
from vlp.padding import trim_padding
from vlp.zeroshot.templates import fill

log = logging.getLogger(__name__)

SCORINGS = ("itc", "filip", "itm")


class TextEncoder:
    """Tokenizes prompts and runs the text tower in batches (no grad)."""

    def __init__(self, model, tokenizer, max_len: int, batch_size: int = 256,
                 progress: bool = True) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_len, self.batch_size, self.progress = max_len, batch_size, progress

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from vlp.data import tokenize
        batch = tokenize(self.tokenizer, texts, self.max_len)
        return trim_padding(batch["input_ids"], batch["attention_mask"])

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), D] normalized global embeddings."""
        ids, mask = self.tokenize(texts)
        out = None
        for rows in self._length_sorted_batches(mask, "class embeddings"):
            emb = self.model.encode_text(*trim_padding(ids[rows], mask[rows])).float()
            out = emb.new_empty(len(texts), emb.shape[-1]) if out is None else out
            out[rows] = emb
        return out

    @torch.no_grad()
    def embed_tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """FILIP token embeddings [N, L, Df] and mask [N, L], padded to one length."""
        ids, mask = self.tokenize(texts)
        out = None
        for rows in self._length_sorted_batches(mask, "prompt tokens"):
            tokens = self.model.encode_text_tokens(*trim_padding(ids[rows], mask[rows])).float()
            if out is None:
                out = tokens.new_zeros(len(texts), ids.shape[1], tokens.shape[-1])
            out[rows, :tokens.shape[1]] = tokens
        return out, mask

    def _length_sorted_batches(self, mask: torch.Tensor, what: str):
        """Row batches of similar prompt length (each is then trimmed to its longest):
        templates differ in length, and a batch costs as much as its longest prompt."""
        lengths = mask.sum(1)
        order = lengths.argsort(stable=True)
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc=what, unit="batch",
                          disable=not self.progress or len(starts) < 4):
            yield order[start:start + self.batch_size]


def ensemble(prompt_embeddings: torch.Tensor, n_classes: int) -> torch.Tensor:
    """[C*T, D] class-major prompt embeddings -> [C, D]: mean over templates, renormalized."""
    per_class = prompt_embeddings.view(n_classes, -1, prompt_embeddings.shape[-1])
    return F.normalize(F.normalize(per_class, dim=-1).mean(1), dim=-1)


def prompts_for(classnames: list[str], templates: list[str]) -> list[str]:
    return [fill(t, c) for c in classnames for t in templates]


class ZeroShotClassifier:
    def __init__(self, model, encoder: TextEncoder, classnames: list[str],
                 templates: list[str] | None, scoring: str = "itc", itm_k: int = 5,
                 cache: "EmbeddingCache | None" = None, class_embeddings: torch.Tensor | None = None,
                 filip_chunk: int = 256) -> None:
        if scoring not in SCORINGS:
            raise ZeroShotError(f"--scoring must be one of {SCORINGS}, got {scoring!r}")
        if templates is None and scoring != "itc":
            raise ZeroShotError(f"learned prompts support --scoring itc only, not {scoring}")
        if scoring == "filip" and not model.has_filip:
            raise ZeroShotError("--scoring filip: this model has no FILIP heads (trained with loss.filip: 0)")
        if scoring == "itm" and not model.has_itm:
            raise ZeroShotError("--scoring itm: this model has no ITM head (trained with loss.itm: 0)")
        self.model, self.encoder = model, encoder
        self.classnames, self.templates = classnames, templates
        self.scoring, self.itm_k, self.filip_chunk = scoring, itm_k, filip_chunk
        self.logit_scale = _logit_scale(model, scoring)
        prompts = prompts_for(classnames, templates) if templates is not None else None
        if class_embeddings is None and scoring != "filip":
            class_embeddings = _cached(cache, "itc", prompts,
                                       lambda: ensemble(encoder.embed(prompts), len(classnames)))
        self.class_embeddings = class_embeddings
        if scoring == "filip":
            self.prompt_tokens, self.prompt_mask = _cached(
                cache, "filip", prompts, lambda: encoder.embed_tokens(prompts))
        if scoring == "itm":
            self.prompt_ids, self.prompt_attention = encoder.tokenize(prompts)

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C] class probabilities for a batch of transformed images."""
        if self.scoring == "filip":
            return (self.logit_scale * self.filip_scores(images)).softmax(-1)
        probs = self.itc_logits(images).softmax(-1)
        if self.scoring == "itm":
            probs = self.itm_rerank(images, probs)
        return probs

    def itc_logits(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model.encode_image(images).float()
        return self.logit_scale * features @ self.class_embeddings.T

    def filip_scores(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C]: image->prompt FILIP score, averaged over each class's templates."""
        image_tokens = self.model.encode_image_tokens(images)
        scores = []
        for start in range(0, len(self.prompt_tokens), self.filip_chunk):
            end = start + self.filip_chunk
            i2t, _ = self.model.filip_scores(image_tokens, self.prompt_tokens[start:end],
                                             self.prompt_mask[start:end])
            scores.append(i2t.float())
        return torch.cat(scores, 1).view(len(images), self.n_classes, -1).mean(-1)

    def itm_rerank(self, images: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        k = min(self.itm_k, self.n_classes)
        top_p, top_c = probs.topk(k, dim=1)  # [B, k]
        states = self.model.encode_image_states(images)
        n_templates = len(self.templates)
        b = len(images)
        pair_states = states.repeat_interleave(k, dim=0)  # [B*k, N, W]
        match = torch.zeros(b, k)
        for t in range(n_templates):
            rows = (top_c * n_templates + t).reshape(-1)
            p = self.model.itm_scores(self.prompt_ids[rows], self.prompt_attention[rows],
                                      image_states=pair_states)
            match += p.float().view(b, k)
        match /= n_templates
        shares = match / match.sum(1, keepdim=True).clamp_min(1e-12)
        out = probs.clone()
        out.scatter_(1, top_c, top_p.sum(1, keepdim=True) * shares)
        return out


def _logit_scale(model, scoring: str) -> float:
    """The learned temperature the model was trained with (ITC's, or FILIP's for filip)."""
    return float(model.filip_logit_scale if scoring == "filip" else model.logit_scale)


# --------------------------------------------------------------------------- cache

class EmbeddingCache:
    """Class embeddings on disk, keyed by model weights + kind + the exact prompts."""

    def __init__(self, directory: Path, model_fingerprint: str) -> None:
        self.directory = Path(directory)
        self.model_fingerprint = model_fingerprint
        self.hits = 0

    def path_for(self, kind: str, prompts: list[str]) -> Path:
        digest = hashlib.sha256()
        digest.update(self.model_fingerprint.encode())
        digest.update(kind.encode())
        for prompt in prompts:
            digest.update(prompt.encode() + b"\0")
        return self.directory / f"{kind}-{digest.hexdigest()[:20]}.pt"

    def get_or_compute(self, kind: str, prompts: list[str], compute):
        path = self.path_for(kind, prompts)
        if path.is_file():
            try:
                value = torch.load(path, map_location="cpu", weights_only=True)
                self.hits += 1
                log.info("class embeddings from cache %s", path)
                return value
            except Exception as err:  # a damaged cache file is recomputed, not fatal
                log.warning("ignoring unreadable cache file %s: %s", path, err)
        value = compute()
        atomic_write(path, lambda tmp: torch.save(value, tmp))
        return value


def _cached(cache: EmbeddingCache | None, kind: str, prompts, compute):
    if cache is None or prompts is None:
        return compute()
    return cache.get_or_compute(kind, prompts, compute)

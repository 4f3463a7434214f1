"""Caption generation: determinism, max length, stopping at [SEP], beam = greedy at 1 beam."""
from __future__ import annotations

import pytest
import torch

from test_model import tiny_batch, tiny_cfg, tiny_tokenizer
from vlp.model import add_decoder_token, build_model

SEP, PAD = 102, 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(tiny_cfg()).eval()
    with torch.no_grad():  # a livelier untrained LM head: distinct tokens, not one repeated
        m.decoder.bias.normal_(0, 3.0)
    return m


@pytest.fixture(scope="module")
def images():
    return tiny_batch(b=3)["image"]


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_greedy_and_beam_are_deterministic_and_bounded(model, images, method):
    first = model.generate_ids(images, method=method, max_new_tokens=6)
    again = model.generate_ids(images, method=method, max_new_tokens=6)
    assert torch.equal(first, again)
    assert first.shape[0] == 3 and first.shape[1] <= 6
    assert (first != model.decoder.dec_token_id).all()


def test_generation_stops_at_sep_and_pads_after(model, images):
    with torch.no_grad():
        bias = model.decoder.bias.clone()
        model.decoder.bias[SEP] = 1e4  # [SEP] wins at once
        for method in ("greedy", "beam", "nucleus"):
            out = model.generate_ids(images, method=method, max_new_tokens=8)
            assert out.tolist() == [[SEP]] * 3, method
        model.decoder.bias.copy_(bias)
    out = model.generate_ids(images, method="greedy", max_new_tokens=12)
    for row in out.tolist():
        if SEP in row:
            assert all(t == PAD for t in row[row.index(SEP) + 1:])
        assert PAD not in row[: row.index(SEP) if SEP in row else len(row)]


def test_beam_with_one_beam_is_greedy(model, images):
    assert torch.equal(model.generate_ids(images, method="beam", num_beams=1, max_new_tokens=6),
                       model.generate_ids(images, method="greedy", max_new_tokens=6))


def test_beam_scores_at_least_as_well_as_greedy(model, images):
    """Beam search keeps the greedy path among its candidates, so its best total log-prob
    (length-normalized) is never worse."""
    def mean_logprob(ids):
        tokens = torch.cat([torch.full((len(ids), 1), model.decoder.dec_token_id), ids], 1)
        with torch.no_grad():
            logp = model.decoder(tokens, torch.ones_like(tokens), model.encode_image_states(images)).log_softmax(-1)
        picked = logp[:, :-1].gather(2, tokens[:, 1:, None])[..., 0]
        real = torch.ones_like(picked, dtype=torch.bool)
        for i, row in enumerate(ids.tolist()):
            if SEP in row:
                real[i, row.index(SEP) + 1:] = False
        return (picked * real).sum(1) / real.sum(1)
    greedy = model.generate_ids(images, method="greedy", max_new_tokens=5)
    beam = model.generate_ids(images, method="beam", num_beams=4, max_new_tokens=5)
    assert (mean_logprob(beam) >= mean_logprob(greedy) - 0.05).all()


def test_nucleus_is_reproducible_with_a_generator(model, images):
    a = model.generate_ids(images, method="nucleus", max_new_tokens=6, top_p=0.9,
                           generator=torch.Generator().manual_seed(5))
    b = model.generate_ids(images, method="nucleus", max_new_tokens=6, top_p=0.9,
                           generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape[1] <= 6


def test_generate_returns_strings_and_rejects_bad_arguments(model, images, tmp_path):
    tokenizer = tiny_tokenizer(tmp_path)
    add_decoder_token(tokenizer, model.decoder.dec_token_id)
    captions = model.generate(images, method="greedy", max_new_tokens=4, tokenizer=tokenizer)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    assert all("[SEP]" not in c and "[DEC]" not in c for c in captions)
    with pytest.raises(ValueError, match="method"):
        model.generate_ids(images, method="topk")
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate_ids(images, method="greedy", max_new_tokens=0)
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(images)
    with pytest.raises(ValueError, match="temperature"):
        model.generate_ids(images, method="nucleus", temperature=0.0)


def test_caption_pipeline_writes_one_line_per_readable_image(model, tmp_path, capsys):
    import json
    import sys
    from pathlib import Path

    from PIL import Image

    from test_model import tiny_cfg
    from vlp.model import save_model_dir

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
    import caption as caption_cli

    tokenizer = tiny_tokenizer(tmp_path / "tok")
    add_decoder_token(tokenizer, model.decoder.dec_token_id)
    save_model_dir(model, tiny_cfg(), tokenizer, tmp_path / "model")
    folder = tmp_path / "images"
    folder.mkdir()
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (20, 20), colour).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "captions.jsonl"
    code = caption_cli.main(["--model", str(tmp_path / "model"), "--images", str(folder),
                             "--method", "greedy", "--max-new-tokens", "4", "--out", str(out)])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["image"]).name for r in rows] == ["0.png", "1.png"]
    assert all(isinstance(r["caption"], str) for r in rows)
    assert "skipping" in capsys.readouterr().err
    assert caption_cli.main(["--model", str(tmp_path / "nope"), "--images", str(folder)]) == 2


def test_decoder_is_causal_and_starts_from_dec(model):
    batch = tiny_batch(b=2, length=6)
    ids, mask = batch["input_ids"].clone(), torch.ones(2, 6, dtype=torch.long)
    states = model.encode_image_states(batch["image"])
    changed = ids.clone()
    changed[:, 4] = 7
    with torch.no_grad():
        a, b = model.decoder(ids, mask, states), model.decoder(changed, mask, states)
        torch.testing.assert_close(a[:, :4], b[:, :4])  # the future does not leak backwards
        assert not torch.allclose(a[:, 4:], b[:, 4:])
        # Position 0 is always [DEC], whatever the tokenizer put there.
        other_first = ids.clone()
        other_first[:, 0] = 50
        torch.testing.assert_close(model.decoder(other_first, mask, states), a)


@pytest.mark.parametrize("share", [True, False])
def test_decoder_weight_sharing(share):
    cfg = tiny_cfg()
    cfg.model.decoder.share_weights = share
    m = build_model(cfg)
    dec, text = m.decoder, m.text
    encoder_layers = list(text.layers) + list(text.fusion)
    for mine, theirs in zip(dec.layers, encoder_layers):
        assert mine.attention is not theirs.attention  # self-attention is always the decoder's own
        torch.testing.assert_close(mine.attention.self.query.weight, theirs.attention.self.query.weight)
        assert (mine.intermediate is theirs.intermediate) == share
    assert (dec.layers[-1].crossattention is text.fusion[0].crossattention) == share
    assert (dec.embeddings is text.embeddings) == share
    # Cross-attention sits where the fusion layer is (the top K layers).
    assert [layer.crossattention is not None for layer in dec.layers] == [False, False, True]
    # The LM head is the word-embedding matrix itself.
    hidden = torch.randn(1, 2, 32)
    expected = torch.nn.functional.linear(dec.transform(hidden), dec.embeddings.word_embeddings.weight, dec.bias)
    torch.testing.assert_close(dec.logits(hidden), expected)
    assert not [n for n, _ in dec.named_parameters() if "decoder.weight" in n]


def test_cached_step_equals_the_full_forward(lively, images):
    """Each cached step's logits are the full forward's last position over the same prefix."""
    model = lively
    states = model.encode_image_states(images)
    tokens = torch.tensor([[model.decoder.dec_token_id, 7, 9, 11, 102]] * 3)
    cache = model.decoder.start_cache(states, tokens.shape[1])
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            full = model.decoder(tokens[:, :t + 1], torch.ones(3, t + 1, dtype=torch.long), states)[:, -1]
            torch.testing.assert_close(model.decoder.step(tokens[:, t], cache), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cache is full"):
        model.decoder.step(tokens[:, 0], cache)


@pytest.fixture(scope="module")
def lively():
    """A decoder whose next token depends on the whole prefix and the image (at init the
    layers are near identities and the output repeats one token), so beams reorder and
    a cache holding the wrong rows would change the captions."""
    torch.manual_seed(0)
    m = build_model(tiny_cfg()).eval()
    with torch.no_grad():
        for module in m.decoder.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 0.1)
        m.decoder.embeddings.word_embeddings.weight.normal_(0, 1.0)
    return m


@pytest.mark.parametrize("method,options", [("greedy", {}), ("beam", {"num_beams": 4}),
                                            ("nucleus", {"top_p": 0.9})])
def test_generation_with_the_cache_equals_generation_without(lively, images, method, options):
    def run(cache):
        if method == "nucleus":
            options["generator"] = torch.Generator().manual_seed(3)
        return lively.generate_ids(images, method=method, max_new_tokens=10, cache=cache, **options)
    cached = run(True)
    assert torch.equal(cached, run(False))
    assert len({tuple(row) for row in cached.tolist()}) > 1  # the images get different captions


@pytest.mark.parametrize("method", ["greedy", "beam", "nucleus"])
@pytest.mark.parametrize("cache", [True, False])
def test_captions_stop_where_the_position_table_ends(model, images, method, cache):
    """A caption longer than the text tower's positions cannot be placed: asking for more
    (the demo decoder's 20 tokens on a 16-position tower) gives at most positions − 1 (the
    bos holds position 0) instead of failing in the embeddings mid-eval."""
    positions = model.decoder.embeddings.position_embeddings.num_embeddings
    ids = model.generate_ids(images, method=method, max_new_tokens=positions + 5, cache=cache,
                             generator=torch.Generator().manual_seed(0))
    assert ids.shape[1] <= positions - 1

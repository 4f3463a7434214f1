"""Search API: text→image and image→image against exact scores, reranks, eval, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_retrieval_support import encoder, shape_image, tiny_index
from vlp.retrieval import store
from vlp.data.text import tokenize
from vlp.retrieval.evaluate import _rerank, evaluate
from vlp.retrieval.search import QueryError, Searcher


@pytest.fixture(scope="module")
def searcher() -> Searcher:
    return Searcher(tiny_index(), encoder=encoder(), rerank_candidates=12)


def test_text_search_matches_exact_scores(searcher):
    hits = searcher.search_text("a red circle", k=5)
    query = encoder().text_embeddings(["a red circle"])[0]
    exact = np.asarray(searcher.items.image_emb, np.float32) @ query
    best = np.argsort(-exact)[:5]
    assert [h.id for h in hits] == searcher.items.ids[best].tolist()
    np.testing.assert_allclose([h.score for h in hits], exact[best], rtol=1e-5, atol=1e-6)
    top = searcher.items.item(best[0])
    assert hits[0].key == top["key"] and hits[0].caption == top["captions"][0]


def test_image_query_finds_the_same_image_first(searcher):
    # Key 010012 is sample 12 (shard 1): a purple square drawn with seed 12 (see tiny_shards).
    hits = searcher.search_image(encoder().decode(shape_image("purple", "square", 12)), k=3)
    assert hits[0].key == "010012" and hits[0].score > 0.995


@pytest.mark.parametrize("rerank", ["filip", "itm"])
def test_rerank_orders_the_index_candidates_by_the_scaled_combination(searcher, rerank):
    k, candidates = 5, searcher.rerank_candidates
    plain = searcher.search_text("a blue triangle", k=candidates)
    reranked = searcher.search_text("a blue triangle", k=k, rerank=rerank)
    scores = [h.score for h in reranked]
    assert scores == sorted(scores, reverse=True)
    by_id = {h.id: h for h in plain}
    assert {h.id for h in reranked} <= set(by_id)  # only candidates the index returned
    for h in reranked:
        assert h.index_score == pytest.approx(by_id[h.id].score, abs=1e-6)
        assert set(h.as_dict()) == {"id", "score", "key", "caption", "index_score", "rerank_score"}
    # Independently recomputed rerank scores of all candidates, combined with their index
    # scores as s_itc·cos + log p_itm (or + s_filip·filip): the top-k by that is the answer.
    rows = searcher.items.rows(np.array([h.id for h in plain]))
    if rerank == "filip":
        tokens = torch.from_numpy(np.asarray(searcher.items.tokens[rows], np.float32))
        fresh = encoder().filip_text_to_image(tokens, "a blue triangle").numpy()
    else:
        images = torch.stack([encoder().decode(searcher.image_bytes(int(r))) for r in rows])
        fresh = model_itm(["a blue triangle"] * len(rows), encoder().image_states(images)).numpy()
    model = encoder().model
    cos = np.array([h.score for h in plain], np.float32)
    if rerank == "filip":
        combined = float(model.logit_scale) * cos + float(model.filip_logit_scale) * fresh
    else:
        combined = float(model.logit_scale) * cos + np.log(np.clip(fresh, 1e-6, None))
    expected = np.argsort(-combined, kind="stable")[:k]
    assert [h.id for h in reranked] == [plain[i].id for i in expected]
    np.testing.assert_allclose([h.rerank_score for h in reranked], fresh[expected], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scores, combined[expected], rtol=1e-4, atol=1e-5)
    assert "rerank_score" not in plain[0].as_dict()


def model_itm(texts: list[str], image_states: torch.Tensor) -> torch.Tensor:
    """The model's own ITM path: every pair padded to max_len, text layers run per pair."""
    tok = tokenize(encoder().tokenizer, texts, encoder().max_len)
    with torch.inference_mode():
        return encoder().model.itm_scores(tok["input_ids"], tok["attention_mask"], image_states=image_states)


def test_itm_from_shared_text_states_equals_the_models_itm(searcher):
    texts = ["a red circle", "a very long caption about a small green square on a gray field",
             "a red circle", "cyan", "a red circle"]
    images = torch.stack([encoder().decode(searcher.image_bytes(r)) for r in range(len(texts))])
    states = encoder().image_states(images)
    expected = model_itm(texts, states)
    torch.testing.assert_close(encoder().itm(texts, states), expected, rtol=1e-4, atol=1e-5)
    # Eval scores every (query, candidate) cell from text states computed once per text.
    t2i_rows = np.array([[0, 3, -1], [2, 1, 4]])
    i2t_rows = np.array([[1, 0, 2], [-1, 3, 1]])
    t2i, i2t = _rerank(searcher, "itm", texts, t2i_rows, i2t_rows, batch_size=4)
    all_states = encoder().image_states(torch.stack(
        [encoder().decode(searcher.image_bytes(r)) for r in range(len(searcher.items))]))
    for (q, c), value in np.ndenumerate(t2i):
        want = -np.inf if t2i_rows[q, c] < 0 else float(model_itm([texts[q]], all_states[t2i_rows[q, c]][None]))
        assert value == pytest.approx(want, rel=1e-4, abs=1e-5)
    for (q, c), value in np.ndenumerate(i2t):
        want = -np.inf if i2t_rows[q, c] < 0 else float(model_itm([texts[i2t_rows[q, c]]], all_states[q][None]))
        assert value == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_query_errors_are_clear(searcher):
    with pytest.raises(QueryError, match="has 3 dims, the index has 32"):
        searcher.search_embedding(np.ones(3), k=2)
    with pytest.raises(QueryError, match="finite and non-zero"):
        searcher.search_embedding(np.zeros(32), k=2)
    with pytest.raises(QueryError, match="needs a text query"):
        searcher.search_image(encoder().decode(shape_image("red", "circle", 0)), k=2, rerank="itm")
    with pytest.raises(QueryError, match="unknown rerank"):
        searcher.search_text("x", k=2, rerank="bm25")


def test_k_larger_than_the_index_returns_every_item(searcher):
    assert len(searcher.search_embedding(np.ones(32), k=100)) == len(searcher.items)


def test_eval_reports_recall_for_exact_index_and_reranks(searcher):
    report = evaluate(searcher, candidates=12, batch_size=32)
    assert set(report) == {"exact", "index", "index+filip", "index+itm"}
    for name, values in report.items():
        for key in ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10"):
            assert 0.0 <= values[key] <= 1.0
        assert values["t2i_r1"] <= values["t2i_r5"] <= values["t2i_r10"]
    # A Flat index is exact search.
    for key in ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10"):
        assert report["index"][key] == pytest.approx(report["exact"][key])
    with pytest.raises(ValueError, match="more than --eval-limit 10"):
        evaluate(searcher, limit=10)


def test_search_cli_prints_a_json_list(capsys):
    from pipelines.search import main

    assert main(["--index", str(tiny_index()), "--text", "a green square", "-k", "3"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 3 and set(results[0]) >= {"id", "score", "key", "caption"}
    assert results[0]["id"] == store.item_id(results[0]["key"])
    assert main(["--index", str(tiny_index()), "--image", "/no/such.jpg"]) == 2
    assert "image file not found: /no/such.jpg" in capsys.readouterr().err


def test_rerank_the_model_cannot_do_is_a_query_error(tmp_path):
    """A model without fusion layers has no ITM head: a clear QueryError, and eval skips it."""
    from test_retrieval_support import TINY, tiny_shards
    from vlp.config import load_config
    from vlp.data.text import build_tokenizer
    from vlp.model import build_model, save_model_dir
    from vlp.retrieval.build import build_index_dir
    from vlp.retrieval.embed import EmbedSettings, embed_shards
    from vlp.retrieval.encoder import Encoder

    cfg = load_config(None, [*TINY, "model.text.fusion_layers=0", "loss.itm=0"])
    model_dir = save_model_dir(build_model(cfg).eval(), cfg, build_tokenizer(cfg.model.text), tmp_path / "m")
    enc = Encoder(model_dir)
    embed_shards(enc, list(tiny_shards())[1:2], tmp_path / "i", EmbedSettings(model=str(model_dir), filip_tokens=4))
    build_index_dir(tmp_path / "i", str(model_dir))
    searcher = Searcher(tmp_path / "i", encoder=enc)
    with pytest.raises(QueryError, match="rerank 'itm' is not available: the model has no ITM head"):
        searcher.search_text("a red circle", 3, rerank="itm")
    assert len(searcher.search_text("a red circle", 3, rerank="filip")) == 3
    report = evaluate(searcher, candidates=4, rerank=("itm",))
    assert "skipped" in report["index+itm"] and report["index"]["t2i_r10"] == report["exact"]["t2i_r10"]

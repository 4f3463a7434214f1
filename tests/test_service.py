"""HTTP service: every bad request is a clear 4xx; good ones match the search API."""
from __future__ import annotations

import base64
import io
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from test_retrieval_support import encoder, shape_image, tiny_index, tiny_model_dir, tiny_shards
from vlp.retrieval import store
from vlp.retrieval.search import Searcher
from vlp.retrieval.service import create_app


@pytest.fixture(scope="module")
def searcher() -> Searcher:
    return Searcher(tiny_index(), encoder=encoder(), rerank_candidates=8)


@pytest.fixture(scope="module")
def client(searcher) -> TestClient:
    return TestClient(create_app(searcher, max_k=20, max_body_bytes=64_000), raise_server_exceptions=False)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_health_items_and_openapi(client, searcher):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["items"] == 30 and health["dims"] == 32
    item_id = store.item_id("020025")
    item = client.get(f"/items/{item_id}").json()
    assert item["key"] == "020025" and item["id"] == item_id and item["json"]["n"] == 25
    image = client.get(f"/items/{item_id}/image")
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert image.content == searcher.image_bytes(searcher.items.row(item_id))
    assert "/search" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200
    assert "<form" in client.get("/").text


def test_search_by_text_image_and_embedding(client, searcher):
    got = client.post("/search", json={"text": "a cyan square", "k": 4}).json()["results"]
    assert [r["id"] for r in got] == [h.id for h in searcher.search_text("a cyan square", 4)]
    got = client.post("/search", json={"image": b64(shape_image("purple", "square", 12)), "k": 2}).json()["results"]
    assert got[0]["key"] == "010012"
    # A data: URL (what a browser's FileReader gives) works too.
    got = client.post("/search", json={"image": "data:image/jpeg;base64," + b64(shape_image("purple", "square", 12)),
                                        "k": 1}).json()["results"]
    assert got[0]["key"] == "010012"
    vec = np.asarray(searcher.items.image_emb[5], np.float32)
    got = client.post("/search", json={"embedding": vec.tolist(), "k": 1}).json()["results"]
    assert got[0]["id"] == int(searcher.items.ids[5])
    reranked = client.post("/search", json={"text": "a red circle", "k": 3, "rerank": "filip"}).json()["results"]
    assert [r["id"] for r in reranked] == [h.id for h in searcher.search_text("a red circle", 3, "filip")]


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not valid JSON"),
    (b'{"text": "a", "image": "AAAA"}', 422, "exactly one of text, image, embedding (got text, image)"),
    (b'{"k": 3}', 422, "exactly one of text, image, embedding (got none)"),
    (b'{"text": "   "}', 422, "text is empty"),
    (b'{"text": "a", "k": 0}', 422, "k must be between 1 and 20, got 0"),
    (b'{"text": "a", "k": 21}', 422, "k must be between 1 and 20, got 21"),
    (b'{"text": "a", "k": "5"}', 422, "k: Input should be a valid integer"),
    (b'{"text": "a", "rerank": "bm25"}', 422, "rerank: Input should be 'filip' or 'itm'"),
    (b'{"text": "a", "colour": 1}', 422, "colour: Extra inputs are not permitted"),
    (b'{"image": "%%%notbase64"}', 400, "image is not valid base64"),
    (b'{"image": "bm90IGFuIGltYWdl"}', 400, "image could not be decoded"),
    (b'{"embedding": [1, 2, 3]}', 400, "embedding has 3 dims, the index has 32"),
    (b'{"embedding": [1, 2, 3], "rerank": "filip"}', 400, "rerank needs a text or image query"),
    (b'[1, 2]', 422, "Input should be a valid dictionary"),
    # A lone surrogate is no Unicode text: no tokenizer can take it (was a 500).
    (b'{"text": "\\ud800"}', 422, "text: text is not valid Unicode: lone surrogate U+D800 at position 0"),
    (b'{"text": "red \\udfff"}', 422, "lone surrogate U+DFFF at position 4"),
    # Zero-width and control characters alone are as empty as spaces (was accepted).
    (b'{"text": "\\u200b\\u200d\\ufeff"}', 422, "text: text is empty"),
    (b'{"text": "\\u0000\\u0007\\n"}', 422, "text: text is empty"),
    # 30,000 levels of nesting (was a 500 RecursionError).
    (b"[" * 30_000 + b"]" * 30_000, 400, "nested too deeply"),
    (b'{"text": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", 400, "nested too deeply"),
    # Embeddings are numbers, as strictly as k is an integer (strings and booleans were taken).
    (b'{"embedding": ["1", true]}', 422, "embedding.0: Input should be a valid number"),
    (b'{"embedding": [1.0, true]}', 422, "embedding.1: Input should be a valid number"),
])
def test_bad_requests_get_clear_4xx(client, body, status, message):
    response = client.post("/search", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


def test_visible_text_with_joiners_is_a_query(client):
    # Zero-width joiners inside a text with visible characters are fine (emoji sequences).
    response = client.post("/search", json={"text": "a red\u200dcircle", "k": 2})
    assert response.status_code == 200 and len(response.json()["results"]) == 2


def test_itm_rerank_of_an_image_query_is_refused(client):
    response = client.post("/search", json={"image": b64(shape_image("red", "circle", 0)), "rerank": "itm"})
    assert response.status_code == 400 and "needs a text query" in response.json()["detail"]


def test_openapi_describes_every_answer_and_the_request_rules(client):
    import jsonschema_rs  # comes with schemathesis (the test extra)

    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/search"]["post"]
    assert {"200", "400", "413", "422", "503"} <= set(post["responses"])
    assert {"404"} <= set(spec["paths"]["/items/{item_id}"]["get"]["responses"])
    assert {"200", "404", "503"} <= set(spec["paths"]["/items/{item_id}/image"]["get"]["responses"])
    schema = post["requestBody"]["content"]["application/json"]["schema"]
    assert schema["properties"]["k"]["minimum"] == 1 and schema["properties"]["k"]["maximum"] == 20
    valid = jsonschema_rs.validator_for(schema).is_valid
    vector = [0.1] * 32
    for body in ({"text": "a"}, {"text": "a", "image": None, "k": 20, "rerank": "itm"}, {"image": "AAAA", "rerank": "filip"},
                 {"embedding": vector}):
        assert valid(body), body
    for body in ({}, {"k": 3}, {"text": "a", "image": "AAAA"}, {"text": ""}, {"text": "a", "k": 0}, {"text": "a", "k": 21},
                 {"embedding": [1, 2, 3]}, {"embedding": vector, "rerank": "filip"}, {"image": "AAAA", "rerank": "itm"},
                 {"embedding": ["1", True] + vector[2:]}, {"text": "a", "colour": 1}):
        assert not valid(body), body
        response = client.post("/search", json=body)
        assert response.status_code in (400, 422), (body, response.text)


def test_schema_fuzzing_finds_no_server_error_and_no_schema_mismatch(searcher):
    """schemathesis against the app's own OpenAPI: every answer is documented (status, content
    type, body schema), schema-invalid requests are refused, no 5xx. Not checked: that every
    schema-valid request is accepted; some rules are not JSON Schema's to say (the image must
    be a decodable picture, the text visible, the embedding non-zero) and answer 400/413."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    app = create_app(searcher, max_k=20, max_body_bytes=64_000)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 4
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            case.call_and_validate(excluded_checks=[positive_data_acceptance])
        fuzz()


def test_oversize_body_and_unknown_item(client):
    response = client.post("/search", json={"text": "x" * 70_000})
    assert response.status_code == 413 and "64000-byte limit" in response.json()["detail"]

    def chunks():  # no content-length: the limit must hold while streaming too
        for _ in range(20):
            yield b"x" * 5_000
    response = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert client.get("/items/12345").status_code == 404
    assert client.get("/items/notanumber").status_code == 422
    assert client.get("/health").status_code == 200  # still up


def test_concurrent_requests_get_their_own_answers(searcher):
    app = create_app(searcher, max_k=20)
    client = TestClient(app)
    queries = [f"a {c} {s}" for c in ("red", "green", "blue", "black") for s in ("circle", "square", "triangle")]
    expected = {q: [h.id for h in searcher.search_text(q, 5)] for q in queries}
    start = threading.Barrier(8)

    def ask(q):
        if queries.index(q) < 8:
            start.wait()  # the first eight arrive together, so the batcher sees a pile-up
        return q, [r["id"] for r in client.post("/search", json={"text": q, "k": 5}).json()["results"]]

    with ThreadPoolExecutor(8) as pool:
        answers = dict(pool.map(ask, queries * 2))
    assert answers == expected
    assert app.state.batcher.batches < len(queries) * 2  # some texts shared a batch


def test_text_query_without_a_model_is_503_not_500(tmp_path):
    import shutil

    index = tmp_path / "idx"
    shutil.copytree(tiny_index(), index)
    manifest = (index / "manifest.json")
    manifest.write_text(manifest.read_text().replace(str(tiny_index().parent / "model"), str(tmp_path / "gone")))
    client = TestClient(create_app(Searcher(index), max_k=5))
    response = client.post("/search", json={"text": "a red circle", "k": 2})
    assert response.status_code == 503 and "gone" in response.json()["detail"]
    vec = np.ones(32, np.float32).tolist()
    assert client.post("/search", json={"embedding": vec, "k": 2}).status_code == 200


class _PoisonEncoder:
    """The tiny encoder, except that a batch holding "POISON" fails, and the first batch
    waits for `release`, so the texts sent meanwhile pile up into one batch."""

    def __init__(self, inner):
        self.inner, self.release, self.calls = inner, threading.Event(), []

    def text_embeddings(self, texts):
        self.calls.append(list(texts))
        if len(self.calls) == 1:
            self.release.wait(30)
        if "POISON" in texts:
            raise RuntimeError("this text breaks the model")
        return self.inner.text_embeddings(texts)


def test_one_failing_text_fails_alone_not_its_whole_batch():
    from vlp.retrieval.service import TextBatcher

    poison = _PoisonEncoder(encoder())
    batcher = TextBatcher(Searcher(tiny_index(), encoder=poison))
    texts = ["a red circle", "a blue square", "POISON", "a cyan square", "a green triangle", "a black circle"]
    with ThreadPoolExecutor(len(texts) + 1) as pool:
        first = pool.submit(batcher.embed, "warm up")
        while not poison.calls:
            threading.Event().wait(0.01)
        futures = {text: pool.submit(batcher.embed, text) for text in texts}
        while batcher.queue.qsize() < len(texts):
            threading.Event().wait(0.01)
        poison.release.set()
        first.result(timeout=30)
        with pytest.raises(RuntimeError, match="breaks the model"):
            futures["POISON"].result(timeout=30)
        for text in texts:
            if text != "POISON":
                want = encoder().text_embeddings([text])[0]
                np.testing.assert_allclose(futures[text].result(timeout=30), want, atol=1e-5)
    assert sorted(poison.calls[1]) == sorted(texts)  # they did share a batch, which failed


def test_a_lone_surrogate_among_concurrent_good_queries_fails_alone(searcher):
    client = TestClient(create_app(searcher, max_k=20), raise_server_exceptions=False)
    bodies = [b'{"text": "a red circle", "k": 3}'] * 10 + [b'{"text": "\\ud800", "k": 3}'] * 5
    start = threading.Barrier(len(bodies))

    def ask(body):
        start.wait()
        return body, client.post("/search", content=body, headers={"content-type": "application/json"})

    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(ask, bodies))
    assert sorted(r.status_code for _, r in answers) == [200] * 10 + [422] * 5


def png_declaring(width: int, height: int) -> bytes:
    """One color: a few KB on the wire, width x height pixels once decoded."""
    buf = io.BytesIO()
    Image.new("RGBA", (width, height), (200, 0, 0, 255)).save(buf, "PNG")
    return buf.getvalue()


def test_an_image_over_the_pixel_budget_is_413_before_decoding(searcher):
    client = TestClient(create_app(searcher, max_k=20), raise_server_exceptions=False)
    big = png_declaring(7000, 7000)  # 49 MP, over the default 40 MP budget; ~150 KB of PNG
    response = client.post("/search", json={"image": b64(big), "k": 2})
    assert response.status_code == 413, response.text
    assert "7000x7000 = 49.0 MP" in response.json()["detail"] and "40 MP budget" in response.json()["detail"]
    small = TestClient(create_app(searcher, max_k=20, max_image_pixels=1_000_000))
    response = small.post("/search", json={"image": b64(png_declaring(1200, 1000)), "k": 2})
    assert response.status_code == 413 and "over the 1 MP budget" in response.json()["detail"]
    assert small.post("/search", json={"image": b64(png_declaring(900, 1000)), "k": 2}).status_code == 200


def test_image_decodes_are_bounded(searcher):
    """However many image queries arrive together, at most `max_decodes` decode at once."""
    active, peak, lock = [0], [0], threading.Lock()
    real_decode = searcher.encoder.decode

    def counted(data, max_pixels=None):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            threading.Event().wait(0.05)
            return real_decode(data, max_pixels)
        finally:
            with lock:
                active[0] -= 1

    client = TestClient(create_app(searcher, max_k=20, max_decodes=2))
    start = threading.Barrier(8)

    def ask(i):
        start.wait()
        return client.post("/search", json={"image": b64(shape_image("red", "circle", i)), "k": 1}).status_code

    searcher.encoder.decode = counted
    try:
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(ask, range(8))) == [200] * 8
    finally:
        del searcher.encoder.decode
    assert peak[0] == 2


def test_item_names_its_shard_relative_to_the_shard_folder(client, searcher):
    item_id = store.item_id("020025")
    response = client.get(f"/items/{item_id}")
    assert response.json()["shard"] == "part2-000000.tar"
    root = str(Path(tiny_shards()[0]).parent)
    assert root not in response.text and str(Path(root).parent) not in response.text


@pytest.fixture
def own_shards_index(tmp_path):
    """An index over copies of two tiny shards, so a test can break them."""
    from vlp.retrieval.build import build_index_dir
    from vlp.retrieval.embed import EmbedSettings, embed_shards

    shards = []
    for src in tiny_shards()[1:]:
        shards.append(tmp_path / "shards" / Path(src).name)
        shards[-1].parent.mkdir(exist_ok=True)
        shutil.copy(src, shards[-1])
    settings = EmbedSettings(model=str(tiny_model_dir()), batch_size=8, chunk_size=10, filip_tokens=2)
    embed_shards(encoder(), [str(s) for s in shards], tmp_path / "index", settings)
    build_index_dir(tmp_path / "index", settings.model)
    return tmp_path / "index", shards


def test_a_broken_shard_is_named_in_errors_and_health(own_shards_index):
    index, shards = own_shards_index
    searcher = Searcher(index, encoder=encoder(), rerank_candidates=20)
    client = TestClient(create_app(searcher, max_k=20), raise_server_exceptions=False)
    assert client.get("/health").json()["status"] == "ok"
    itm = {"text": "a red circle", "k": 3, "rerank": "itm"}
    assert client.post("/search", json=itm).status_code == 200
    item_id = store.item_id("010019")  # the last item of the first of the two shards
    with open(shards[0], "r+b") as f:  # cut short, as by a copy that did not finish
        f.truncate(shards[0].stat().st_size // 2)
    for response in (client.post("/search", json=itm), client.get(f"/items/{item_id}/image")):
        assert response.status_code == 503, response.text
        detail = response.json()["detail"]
        assert "shard 'part1-000000.tar' is unreadable (cut short" in detail, detail
        assert str(shards[0].parent) not in detail
    health = client.get("/health").json()
    assert health["status"] == "degraded" and list(health["unreadable_shards"]) == ["part1-000000.tar"]
    assert health["unreadable_shards"]["part1-000000.tar"].startswith("cut short")
    shards[0].unlink()
    response = client.post("/search", json=itm)
    assert response.status_code == 503
    assert "shard 'part1-000000.tar' is unreadable (missing)" in response.json()["detail"]
    assert "model" not in response.json()["detail"]
    assert client.get("/health").json()["unreadable_shards"] == {"part1-000000.tar": "missing"}
    # What needs no shard still works.
    assert client.post("/search", json={"text": "a red circle", "k": 3}).status_code == 200
    assert client.post("/search", json={"text": "a red circle", "k": 3, "rerank": "filip"}).status_code == 200

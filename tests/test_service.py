"""HTTP service: every bad request is a clear 4xx; good ones match the search API."""
from __future__ import annotations

import base64
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from test_retrieval_support import encoder, shape_image, tiny_index
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
])
def test_bad_requests_get_clear_4xx(client, body, status, message):
    response = client.post("/search", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


def test_itm_rerank_of_an_image_query_is_refused(client):
    response = client.post("/search", json={"image": b64(shape_image("red", "circle", 0)), "rerank": "itm"})
    assert response.status_code == 400 and "needs a text query" in response.json()["detail"]


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

"""HTTP search service (FastAPI): POST /search, GET /health, GET /items/{id}, a search page.

Every user mistake is a 4xx whose `detail` says what to fix, and the OpenAPI schema lists
each answer a route can give. Text queries that arrive together are embedded in one batch
by a background thread; a text that fails there fails alone. Image decodes are bounded in
size (pixels, from the header) and in number at a time, so a few large images cannot
exhaust the server's memory.
"""
from __future__ import annotations

import base64
import binascii
import copy
import json
import logging
import queue
import threading
import unicodedata
from concurrent.futures import Future
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import (BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError,
                      field_validator, model_validator)

from vlp.data.images import ImageTooLarge
from vlp.retrieval.search import Hit, QueryError, Searcher, StoreError

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("page.html")
QUERY_KINDS = ("text", "image", "embedding")
# Characters that show nothing: controls, format characters (zero-width space and joiner,
# BOM), separators. A text made only of them is as empty as a blank one.
INVISIBLE = {"Cc", "Cf", "Cs", "Zs", "Zl", "Zp"}


def text_problem(text: str) -> Optional[str]:
    """Why `text` cannot be a query, or None. Lone surrogates (JSON's `"\\ud800"`) are not
    Unicode text: no tokenizer can encode them."""
    for at, char in enumerate(text):
        if "\ud800" <= char <= "\udfff":
            return f"text is not valid Unicode: lone surrogate U+{ord(char):04X} at position {at}"
    if all(unicodedata.category(char) in INVISIBLE for char in text):
        return "text is empty (only spaces, control or zero-width characters)"
    return None


class SearchRequest(BaseModel):
    """Exactly one of `text`, `image` (base64, optionally a data: URL) or `embedding`."""
    model_config = ConfigDict(extra="forbid")
    text: Optional[StrictStr] = Field(None, description="at least one visible character")
    image: Optional[StrictStr] = Field(None, description="base64 image bytes, or a data: URL")
    embedding: Optional[list[StrictFloat]] = Field(None, description="as many numbers as the index has dims")
    k: StrictInt = 10
    rerank: Optional[Literal["filip", "itm"]] = Field(
        None, description="reorder the index's top candidates; needs a text query ('itm') or a text "
                          "or image query ('filip')")

    @field_validator("text")
    @classmethod
    def visible_text(cls, text: Optional[str]) -> Optional[str]:
        problem = None if text is None else text_problem(text)
        if problem:
            raise ValueError(problem)
        return text

    @model_validator(mode="after")
    def one_query(self) -> "SearchRequest":
        given = [name for name in QUERY_KINDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, image, embedding (got {', '.join(given) or 'none'})")
        return self


class ErrorAnswer(BaseModel):
    detail: str


class SearchAnswer(BaseModel):
    results: list[Hit]  # Hit.as_dict leaves out a rerank_score of None


def request_schema(max_k: int, dims: int) -> dict:
    """SearchRequest's JSON schema plus what the server checks beyond field types: k's
    bounds, the embedding's length, exactly one query kind, which reranks each kind takes."""
    schema = copy.deepcopy(SearchRequest.model_json_schema())
    props = schema["properties"]
    props["k"].update(minimum=1, maximum=max_k)
    branches = {name: next(b for b in props[name]["anyOf"] if b["type"] != "null") for name in QUERY_KINDS}
    branches["text"]["minLength"] = 1
    branches["embedding"].update(minItems=dims, maxItems=dims)
    not_null = {"not": {"type": "null"}}
    schema["oneOf"] = [
        {"required": ["text"], "properties": {"text": not_null}},
        {"required": ["image"], "properties": {"image": not_null, "rerank": {"not": {"const": "itm"}}}},
        {"required": ["embedding"], "properties": {"embedding": not_null, "rerank": {"type": "null"}}},
    ]
    return schema


def _answers(**codes: str) -> dict:
    return {int(code.removeprefix("e")): {"model": ErrorAnswer, "description": text} for code, text in codes.items()}


class TextBatcher:
    """Queues text queries; one thread embeds whatever has piled up as one batch.

    No waiting window: a lone query is embedded at once, and queries arriving while a batch
    runs form the next batch, so batching adds no latency. A text is checked before it joins
    a batch, and a batch that fails anyway is retried one text at a time, so only the text
    that fails on its own gets the error.
    """

    def __init__(self, searcher: Searcher, max_batch: int = 32):
        self.searcher, self.max_batch = searcher, max_batch
        self.queue: queue.Queue = queue.Queue()
        self.batches = 0
        threading.Thread(target=self._run, daemon=True, name="text-batcher").start()

    def embed(self, text: str) -> np.ndarray:
        problem = text_problem(text)
        if problem:
            raise QueryError(problem)
        future: Future = Future()
        self.queue.put((text, future))
        return future.result()

    def _run(self) -> None:
        while True:
            pending = [self.queue.get()]
            while len(pending) < self.max_batch:
                try:
                    pending.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            self._answer(pending)

    def _answer(self, pending: list[tuple[str, Future]]) -> None:
        try:
            vectors = self.searcher.encoder.text_embeddings([text for text, _ in pending])
        except Exception as err:  # never kills the thread
            if len(pending) == 1:
                pending[0][1].set_exception(err)
                return
            log.warning("a batch of %d texts failed (%s: %s); embedding them one by one",
                        len(pending), type(err).__name__, err)
            for one in pending:
                self._answer([one])
            return
        self.batches += 1
        for (_, future), vec in zip(pending, vectors):
            future.set_result(vec)


class BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes with 413, before JSON parsing."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps({"detail": f"request body over the {self.limit}-byte limit"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class ImageGate:
    """At most `slots` image decodes at a time, each within `max_pixels`: the bound on the
    memory image queries can take."""

    def __init__(self, max_pixels: int, slots: int):
        self.max_pixels, self.slots = max_pixels, threading.BoundedSemaphore(slots)

    def decode(self, searcher: Searcher, image_bytes: bytes):
        with self.slots:
            return searcher.encoder.decode(image_bytes, self.max_pixels)


def create_app(searcher: Searcher, max_k: int = 100, max_body_bytes: int = 4 << 20,
               max_image_pixels: int = 40_000_000, max_decodes: int = 2) -> FastAPI:
    app = FastAPI(title="vlp retrieval", version="1",
                  description="Text→image and image→image search over a vlp FAISS index.")
    batcher = TextBatcher(searcher)
    gate = ImageGate(max_image_pixels, max_decodes)
    app.state.batcher = batcher

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):  # log it, answer, stay up
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"detail": f"internal error: {type(err).__name__}"}, status_code=500)

    @app.get("/health")
    def health() -> dict:
        """`status` is "degraded" when some shards the items live in are missing or cut
        short (their images cannot be served or ITM-reranked); they are listed."""
        m = searcher.manifest
        broken = searcher.unreadable_shards()
        return {"status": "degraded" if broken else "ok", "items": len(searcher.items), "dims": m.dims,
                "factory": m.factory, "search_params": m.search_params, "recall_at_10": m.recall_at_10,
                "model": m.model, "unreadable_shards": broken}

    @app.post("/search", response_model=None, responses={
        200: {"model": SearchAnswer, "description": "the top-k items, best first"},
        **_answers(e400="invalid JSON, bad base64, an undecodable image, a rerank the query or model cannot take",
                   e413=f"body over the byte limit, or an image over the {max_image_pixels / 1e6:g} MP budget",
                   e422="the body does not match the schema (the detail names the field)",
                   e503="the model or the stored shards the query needs are not available")},
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": request_schema(max_k, searcher.dims)}}}})
    async def search(request: Request) -> dict:
        """Top-k items for one query; `rerank` reorders the index's top candidates."""
        req = _parse(await request.body(), max_k)
        try:
            hits = await run_in_threadpool(_answer, searcher, batcher, gate, req)
        except QueryError as err:
            raise HTTPException(400, str(err))
        except ImageTooLarge as err:
            raise HTTPException(413, f"{err} (the server's --max-image-pixels)")
        except StoreError as err:
            raise HTTPException(503, f"the index's stored data is broken: {err}")
        except FileNotFoundError as err:  # the index's model directory is gone (or --no-model)
            raise HTTPException(503, f"this query needs the model, which is not available: {err}")
        return {"results": [h.as_dict() for h in hits]}

    @app.get("/items/{item_id}", responses=_answers(e404="no item with this id"))
    def item(item_id: int) -> dict:
        """The item's metadata; `shard` is relative to the index's shard folder."""
        return searcher.public_item(_row(searcher, item_id))

    @app.get("/items/{item_id}/image", response_class=Response, responses={
        200: {"content": {mime: {} for mime in ("image/jpeg", "image/png", "image/webp")},
              "description": "the image bytes, read from the shard"},
        **_answers(e404="no item with this id", e503="the shard holding the image is unreadable")})
    def item_image(item_id: int) -> Response:
        row = _row(searcher, item_id)
        try:
            data = searcher.image_bytes(row)
        except StoreError as err:
            raise HTTPException(503, f"the index's stored data is broken: {err}")
        return Response(data, media_type=searcher.image_mime(row),
                        headers={"Cache-Control": "max-age=3600"})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE.read_text()

    app.add_middleware(BodyLimit, limit=max_body_bytes)
    return app


def _parse(raw: bytes, max_k: int) -> SearchRequest:
    try:
        payload = json.loads(raw)
    except RecursionError:
        raise HTTPException(400, "body is not valid JSON: nested too deeply")
    except (ValueError, UnicodeDecodeError) as err:
        raise HTTPException(400, f"body is not valid JSON: {err}")
    try:
        req = SearchRequest.model_validate(payload)
    except ValidationError as err:
        raise HTTPException(422, "; ".join(_explain(e) for e in err.errors()))
    except RecursionError:  # nesting the JSON parser took but validation does not
        raise HTTPException(422, "body nests too deeply")
    if not 1 <= req.k <= max_k:
        raise HTTPException(422, f"k must be between 1 and {max_k}, got {req.k}")
    return req


def _answer(searcher: Searcher, batcher: TextBatcher, gate: ImageGate, req: SearchRequest):
    if req.text is not None:
        return searcher.search_text(req.text, req.k, req.rerank, embedding=batcher.embed(req.text))
    if req.image is not None:
        data = req.image.split(",", 1)[1] if req.image.startswith("data:") else req.image
        try:
            image_bytes = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as err:
            raise QueryError(f"image is not valid base64: {err}")
        try:
            image = gate.decode(searcher, image_bytes)
        except ImageTooLarge:
            raise
        except ValueError as err:
            raise QueryError(f"image could not be decoded: {err}")
        return searcher.search_image(image, req.k, req.rerank)
    if req.rerank is not None:
        raise QueryError("rerank needs a text or image query, not a raw embedding")
    return searcher.search_embedding(np.asarray(req.embedding, dtype=np.float64), req.k)


def _row(searcher: Searcher, item_id: int) -> int:
    row = searcher.items.row(item_id)
    if row is None:
        raise HTTPException(404, f"no item with id {item_id}")
    return row


def _explain(error: dict) -> str:
    where = ".".join(str(p) for p in error.get("loc", ()))
    message = error.get("msg", "invalid").removeprefix("Value error, ")
    return f"{where}: {message}" if where else message

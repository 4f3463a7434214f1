"""HTTP search service (FastAPI): POST /search, GET /health, GET /items/{id}, a search page.

Every user mistake is a 4xx whose `detail` says what to fix. Text queries that arrive
together are embedded in one batch by a background thread.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import queue
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr, ValidationError, model_validator

from vlp.retrieval.search import QueryError, Searcher

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("page.html")


class SearchRequest(BaseModel):
    """Exactly one of `text`, `image` (base64, optionally a data: URL) or `embedding`."""
    model_config = ConfigDict(extra="forbid")
    text: Optional[StrictStr] = None
    image: Optional[StrictStr] = None
    embedding: Optional[list[float]] = None
    k: StrictInt = 10
    rerank: Optional[Literal["filip", "itm"]] = None

    @model_validator(mode="after")
    def one_query(self) -> "SearchRequest":
        given = [name for name in ("text", "image", "embedding") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of text, image, embedding (got {', '.join(given) or 'none'})")
        if self.text is not None and not self.text.strip():
            raise ValueError("text is empty")
        return self


class TextBatcher:
    """Queues text queries; one thread embeds whatever has piled up as one batch.

    No waiting window: a lone query is embedded at once, and queries arriving while a batch
    runs form the next batch, so batching adds no latency.
    """

    def __init__(self, searcher: Searcher, max_batch: int = 32):
        self.searcher, self.max_batch = searcher, max_batch
        self.queue: queue.Queue = queue.Queue()
        self.batches = 0
        threading.Thread(target=self._run, daemon=True, name="text-batcher").start()

    def embed(self, text: str) -> np.ndarray:
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
            try:
                vectors = self.searcher.encoder.text_embeddings([t for t, _ in pending])
                self.batches += 1
                for (_, future), vec in zip(pending, vectors):
                    future.set_result(vec)
            except Exception as err:  # handed to every waiting request, never kills the thread
                for _, future in pending:
                    future.set_exception(err)


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


def create_app(searcher: Searcher, max_k: int = 100, max_body_bytes: int = 4 << 20) -> FastAPI:
    app = FastAPI(title="vlp retrieval", version="1",
                  description="Text→image and image→image search over a vlp FAISS index.")
    batcher = TextBatcher(searcher)
    app.state.batcher = batcher

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):  # log it, answer, stay up
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"detail": f"internal error: {type(err).__name__}"}, status_code=500)

    @app.get("/health")
    def health() -> dict:
        m = searcher.manifest
        return {"status": "ok", "items": len(searcher.items), "dims": m.dims, "factory": m.factory,
                "search_params": m.search_params, "recall_at_10": m.recall_at_10, "model": m.model}

    @app.post("/search", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": SearchRequest.model_json_schema()}}}})
    async def search(request: Request) -> dict:
        """Top-k items for one query; `rerank` reorders the index's top candidates."""
        raw = await request.body()
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise HTTPException(400, f"body is not valid JSON: {err}")
        try:
            req = SearchRequest.model_validate(payload)
        except ValidationError as err:
            raise HTTPException(422, "; ".join(_explain(e) for e in err.errors()))
        if not 1 <= req.k <= max_k:
            raise HTTPException(422, f"k must be between 1 and {max_k}, got {req.k}")
        try:
            hits = await run_in_threadpool(_answer, searcher, batcher, req)
        except QueryError as err:
            raise HTTPException(400, str(err))
        except FileNotFoundError as err:  # the index's model directory is gone (or --no-model)
            raise HTTPException(503, f"this query needs the model, which is not available: {err}")
        return {"results": [h.as_dict() for h in hits]}

    @app.get("/items/{item_id}")
    def item(item_id: int) -> dict:
        return searcher.items.item(_row(searcher, item_id))

    @app.get("/items/{item_id}/image", response_class=Response)
    def item_image(item_id: int) -> Response:
        row = _row(searcher, item_id)
        try:
            data = searcher.image_bytes(row)
        except OSError as err:
            raise HTTPException(404, f"image of item {item_id} is not readable: {err}")
        return Response(data, media_type=searcher.image_mime(row),
                        headers={"Cache-Control": "max-age=3600"})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return PAGE.read_text()

    app.add_middleware(BodyLimit, limit=max_body_bytes)
    return app


def _answer(searcher: Searcher, batcher: TextBatcher, req: SearchRequest):
    if req.text is not None:
        return searcher.search_text(req.text, req.k, req.rerank, embedding=batcher.embed(req.text))
    if req.image is not None:
        data = req.image.split(",", 1)[1] if req.image.startswith("data:") else req.image
        try:
            image_bytes = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as err:
            raise QueryError(f"image is not valid base64: {err}")
        try:
            image = searcher.encoder.decode(image_bytes)
        except ValueError as err:
            raise QueryError(f"image could not be decoded: {err}")
        return searcher.search_image(image, req.k, req.rerank)
    if req.rerank is not None:
        raise QueryError("rerank needs a text or image query, not a raw embedding")
    return searcher.search_embedding(np.asarray(req.embedding, dtype=np.float32), req.k)


def _row(searcher: Searcher, item_id: int) -> int:
    row = searcher.items.row(item_id)
    if row is None:
        raise HTTPException(404, f"no item with id {item_id}")
    return row


def _explain(error: dict) -> str:
    where = ".".join(str(p) for p in error.get("loc", ()))
    message = error.get("msg", "invalid").removeprefix("Value error, ")
    return f"{where}: {message}" if where else message

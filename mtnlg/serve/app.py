"""The HTTP server: FastAPI routes over the continuous-batching engine.

Routes: Megatron's ``PUT /api`` (megatron_api.py); OpenAI's
``POST /v1/completions``, ``POST /v1/chat/completions`` and ``GET /v1/models``
(openai_api.py); ``GET /health`` (200 only once the model is loaded and the
engine runs); ``GET /metrics`` (Prometheus text); and vLLM's tokenizer routes
``GET /tokenizer_info``, ``POST /tokenize``, ``POST /detokenize``, which
lm-eval's ``local-completions`` model uses to tokenize like the server.

Every request handler stays on the event loop: tokenization runs in a worker
thread, generation in the engine thread, and results come back through an
asyncio queue per HTTP call (:class:`Submission`).
"""
from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from dataclasses import dataclass, field
from functools import partial

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest

from mtnlg.serve.engine import Engine, QueueFull, Request
from mtnlg.serve.metrics import CONTENT_TYPE_LATEST, Metrics
from mtnlg.serve.text import ChatTemplate


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


class ClientGone(Exception):
    pass


@dataclass
class ServerState:
    model_name: str
    metrics: Metrics
    tokenizer: object | None = None
    engine: Engine | None = None
    max_len: int = 0
    chat: ChatTemplate | None = None
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    max_body_bytes: int = 16 << 20
    max_token_chars: int = 0  # longest vocabulary entry: n characters need >= n / this tokens
    api_key: str | None = None  # if set, every route but /health and /metrics needs "Authorization: Bearer KEY"

    def ready(self) -> Engine:
        if self.load_error:
            raise ApiError(503, f"model failed to load: {self.load_error}", "server_error")
        if self.engine is None:
            raise ApiError(503, "the model is still loading", "server_error", headers={"Retry-After": "5"})
        if not self.engine.alive:
            raise ApiError(503, f"the engine stopped: {self.engine.error!r}", "server_error")
        return self.engine

    async def encode(self, texts: list[str]) -> list[list[int]]:
        """Tokenize in a worker thread.  A text too long to fit the context
        whatever its tokens is refused without tokenizing it (1 MB takes
        seconds to tokenize and could only be refused afterwards)."""
        limit = self.max_len * self.max_token_chars
        for t in texts:
            if limit and len(t) > limit:
                raise ApiError(400, f"prompt of {len(t)} characters cannot fit this model's maximum context length "
                                    f"of {self.max_len} tokens (no token spans more than {self.max_token_chars} "
                                    "characters)", param="prompt")
        return await run_in_threadpool(self.tokenizer.encode_batch, texts)

    def check_ids(self, ids: list[int]) -> None:
        bad = [t for t in ids if not 0 <= t < self.tokenizer.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {self.tokenizer.vocab_size})", param="prompt")


class Submission:
    """The engine requests of one HTTP call.  ``events`` yields (index,
    Output) as the engine thread produces them and aborts everything left if
    the client disconnects or the consumer stops early."""

    def __init__(self, state: ServerState, prompts: list[list[int]], params: list):
        self.engine = state.ready()
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        base = uuid.uuid4().hex
        self.ids: list[str] = []
        self.open: set[int] = set()
        try:
            for i, (prompt, sp) in enumerate(zip(prompts, params)):
                rid = f"{base}-{i}"
                self.engine.submit(Request(rid, prompt, sp, partial(self._sink, loop, i)))
                self.ids.append(rid)
                self.open.add(i)
        except QueueFull as err:
            self.abort()
            state.metrics.rejected.labels("queue_full").inc()
            raise ApiError(503, str(err), "server_overloaded", headers={"Retry-After": "1"}) from None
        except ValueError as err:
            self.abort()
            raise ApiError(400, str(err), param="max_tokens") from None

    def _sink(self, loop, i, out) -> None:
        loop.call_soon_threadsafe(self.queue.put_nowait, (i, out))

    async def events(self, request: HTTPRequest | None):
        last_check = time.monotonic()
        try:
            while self.open:
                try:
                    i, out = await asyncio.wait_for(self.queue.get(), 0.25)
                except asyncio.TimeoutError:
                    i = out = None
                if request is not None and time.monotonic() - last_check >= 0.25:
                    last_check = time.monotonic()
                    if await request.is_disconnected():
                        raise ClientGone()
                if out is None:
                    continue
                if out.finish_reason:
                    self.open.discard(i)
                yield i, out
        finally:
            self.abort()

    def abort(self) -> None:
        for i in list(self.open):
            self.engine.abort(self.ids[i])
        self.open.clear()


def error_body(message: str, type_: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def create_app(state: ServerState) -> FastAPI:
    from mtnlg.serve import megatron_api, openai_api

    app = FastAPI(title="mtnlg serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.mtnlg = state

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        return JSONResponse(error_body(err.message, err.type, err.param), err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, err: RequestValidationError):
        parts = []
        for e in err.errors()[:3]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            msg = str(e.get("msg", "")).removeprefix("Value error, ")
            if e.get("type") == "json_invalid":
                msg, loc = f"request body is not valid JSON ({msg})", ""
            elif not loc and e.get("type") in ("model_attributes_type", "dict_type", "model_type"):
                msg = "request body must be a JSON object"
            elif not loc and e.get("type") == "missing":
                msg = "request body is empty; expected a JSON object"
            parts.append(f"{loc}: {msg}" if loc else msg)
        return JSONResponse(error_body("; ".join(parts) or "invalid request"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, err: StarletteHTTPException):
        return JSONResponse(error_body(str(err.detail), "not_found_error" if err.status_code == 404
                                       else "invalid_request_error"), err.status_code)

    @app.get("/health")
    async def health():
        try:
            state.ready()
        except ApiError as err:
            return JSONResponse({"status": "unavailable", "reason": err.message}, 503)
        return {"status": "ok", "model": state.model_name}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        state.ready()
        eos = state.tokenizer.hf.id_to_token(state.tokenizer.eod_id)
        return {"eos_token": eos, "bos_token": None, "pad_token": None, "model_max_length": state.max_len,
                "chat_template": state.chat.source if state.chat else None, "tokenizer_class": "mtnlg-bpe"}

    @app.post("/tokenize")
    async def tokenize(request: HTTPRequest):
        state.ready()
        body = await _json(request)
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            raise ApiError(400, "expected {\"prompt\": string}", param="prompt")
        ids = (await state.encode([body["prompt"]]))[0]
        return {"tokens": ids, "count": len(ids), "max_model_len": state.max_len}

    @app.post("/detokenize")
    async def detokenize(request: HTTPRequest):
        state.ready()
        body = await _json(request)
        ids = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ApiError(400, "expected {\"tokens\": [int, ...]}", param="tokens")
        state.check_ids(ids)
        return {"prompt": state.tokenizer.decode(ids)}

    openai_api.register(app, state)
    megatron_api.register(app, state)
    return BodyLimitAndMetrics(app, state)


async def _json(request: HTTPRequest):
    import json
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"request body is not valid JSON: {err}") from None


class BodyLimitAndMetrics:
    """Pure ASGI middleware (Starlette's BaseHTTPMiddleware would buffer
    streams and hide client disconnects): refuses bodies over the limit with
    413 before reading them, checks the API key (401) and counts responses by
    route and status."""

    def __init__(self, app: FastAPI, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.state.max_body_bytes:
            resp = JSONResponse(error_body(f"request body of {int(length)} bytes exceeds the limit of "
                                           f"{self.state.max_body_bytes} bytes"), 413)
            self.state.metrics.http.labels(route, "413").inc()
            return await resp(scope, receive, send)

        if self.state.api_key and route not in ("/health", "/metrics"):
            auth = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(auth.encode(), f"Bearer {self.state.api_key}".encode()):
                resp = JSONResponse(error_body("missing or wrong API key (send 'Authorization: Bearer KEY')",
                                               "authentication_error"), 401)
                self.state.metrics.http.labels(route if route in _ROUTES else "other", "401").inc()
                return await resp(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                known = route if route in _ROUTES else "other"
                self.state.metrics.http.labels(known, str(message["status"])).inc()
            await send(message)
        await self.app(scope, receive, counting_send)

    def __getattr__(self, name):  # tests reach app.state through the wrapper
        return getattr(self.app, name)


_ROUTES = {"/api", "/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
           "/tokenize", "/detokenize", "/tokenizer_info"}

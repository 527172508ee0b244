"""The HTTP routes: an OpenAI-compatible subset for generation, /v1/classify for classification runs.

Every error is a JSON body `{"error": {"message", "type", "code"}}` with a 4xx status that says what was
wrong and how to fix it; the server keeps serving after any of them.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from deltatune.errors import DeltatuneError
from deltatune.serve import registry
from deltatune.serve.batching import DONE, Batcher, Job
from deltatune.serve.engine import CLASSIFY, GENERATE, Engine
from deltatune.serve.errors import ServeError
from deltatune.serve.metrics import Metrics


@dataclass
class Settings:
    max_input_tokens: int = 2048  # per prompt, or per text to classify (before the run's own truncation)
    max_new_tokens: int = 512  # the most a request may ask for (max_tokens)
    max_batch: int = 32  # rows per batch; also the most texts one classify request may send
    max_queue: int = 256  # requests waiting; one more is answered 429
    batch_window_ms: float = 5.0  # how long the first request of a batch waits for company
    timeout_s: float = 60.0  # a request not answered by then is stopped (504)
    max_body_bytes: int = 1 << 20
    admin_token: str | None = None  # POST/DELETE /v1/adapters/{name} only when set
    allowed_root: Path = Path(".")


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str
    texts: list[str] = Field(min_length=1)


class Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send more fields (user, logprobs=None, ...)
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # 0: greedy, equal to `deltatune generate`
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)


class CompletionRequest(Sampling):
    prompt: str
    max_tokens: int = Field(16, ge=1)  # OpenAI's default for completions


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run_dir: str
    merge: bool = False  # serve a LoRA/IA3 run merged (the hot-adapter fast path)


def error_body(message: str, status: int, code: str) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status)


def _validation_message(e: RequestValidationError) -> str:
    parts = []
    for err in e.errors():
        if err.get("type") == "json_invalid":
            return f"the request body is not valid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})"
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"`{where}`: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts)


@dataclass
class Parts:
    """What the routes share: the models, the batcher in front of them, the counters, the limits."""
    engine: Engine
    batcher: Batcher
    metrics: Metrics
    settings: Settings


def create_app(engine: Engine, settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    batcher = Batcher(engine, metrics, settings.max_batch, settings.max_queue, settings.batch_window_ms / 1000)
    parts = Parts(engine, batcher, metrics, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        metrics.adapters.set(len(engine.served))
        yield
        await batcher.stop()  # uvicorn has let in-flight requests finish; anything still queued is answered

    app = FastAPI(title="deltatune serve", lifespan=lifespan)
    app.add_middleware(Observe, settings=settings, metrics=metrics, engine=engine)
    app.state.engine, app.state.batcher, app.state.metrics, app.state.settings = engine, batcher, metrics, settings
    _error_handlers(app)
    _status_routes(app, parts)
    _task_routes(app, parts)
    _admin_routes(app, parts)
    return app


def _error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI-style JSON with a status that says whose fault it was."""

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, e: ServeError) -> JSONResponse:
        return error_body(str(e), e.status, e.code)

    @app.exception_handler(DeltatuneError)
    async def _deltatune_error(request: Request, e: DeltatuneError) -> JSONResponse:
        return error_body(str(e), 400, "invalid_request")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_body(_validation_message(e), 400, "invalid_request")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> JSONResponse:
        return error_body(f"{request.method} {request.url.path}: {e.detail}", e.status_code, "http")


def _status_routes(app: FastAPI, p: Parts) -> None:
    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "adapters": len(p.engine.served), "queue": p.batcher.queue.qsize()}

    @app.get("/metrics")
    async def metrics_text() -> Response:
        return Response(p.metrics.render(), media_type=p.metrics.content_type)

    @app.get("/v1/models")
    async def list_models() -> dict:
        base = p.engine.base
        return {"object": "list", "data": p.engine.cards(),
                "base": None if base is None else {"name": base.name, "revision": base.revision,
                                                   "fingerprint": base.fingerprint},
                "weights_mb": round(p.engine.weights_bytes() / 2**20, 3)}


def _task_routes(app: FastAPI, p: Parts) -> None:
    engine, settings = p.engine, p.settings

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request) -> dict:
        request.state.adapter = body.adapter
        served = engine.get(body.adapter, CLASSIFY)
        if len(body.texts) > settings.max_batch:
            raise ServeError(f"{len(body.texts)} texts in one request, over this server's limit of "
                             f"{settings.max_batch} (--max-batch); split them over several requests", 413,
                             "too_many_texts")
        work = engine.prepare_classify(served, body.texts, settings.max_input_tokens)
        job = p.batcher.submit(Job("classify", len(body.texts), work))
        rows = await p.batcher.result(job, settings.timeout_s)
        return {"object": "classification", "adapter": served.name, "labels": served.labels, "results": rows}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> dict | StreamingResponse:
        request.state.adapter = body.model
        served = engine.get(body.model, GENERATE)
        ids = engine.prepare_prompt(served, settings.max_input_tokens, prompt=body.prompt)
        return await _complete(p, served, ids, body, body.max_tokens, "text_completion")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, request: Request) -> dict | StreamingResponse:
        request.state.adapter = body.model
        served = engine.get(body.model, GENERATE)
        messages = [m.model_dump() for m in body.messages]
        ids = engine.prepare_prompt(served, settings.max_input_tokens, messages=messages)
        max_tokens = body.max_completion_tokens or body.max_tokens or settings.max_new_tokens
        return await _complete(p, served, ids, body, max_tokens, "chat.completion")


async def _complete(p: Parts, served, ids: list[int], body: Sampling, max_tokens: int, kind: str):
    settings = p.settings
    if max_tokens > settings.max_new_tokens:
        raise ServeError(f"max_tokens={max_tokens} is over this server's limit of {settings.max_new_tokens} "
                         f"(--max-new-tokens)", 400, "max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or not all(stop):
        raise ServeError("stop: at most 4 non-empty strings", 400, "stop")
    job = Job("complete", 1)
    row = p.engine.row(served, ids, max_tokens, body.temperature, body.top_p, body.seed, stop)
    row.cancelled = lambda: job.cancelled
    job.work = (served, row)
    head = {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{secrets.token_hex(12)}",
            "created": int(time.time()), "model": served.name}
    if body.stream:
        job.stream = _stream(row)
        p.batcher.submit(job)
        return StreamingResponse(_events(p, job, row, head, kind), media_type="text/event-stream")
    p.batcher.submit(job)
    await p.batcher.result(job, settings.timeout_s)
    p.metrics.tokens.labels(served.name).inc(len(row.new))
    return {**head, "object": kind, "choices": [_choice(kind, row)], "usage": _usage(row)}


def _stream(row) -> asyncio.Queue:
    stream: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    row.on_text = lambda piece: loop.call_soon_threadsafe(stream.put_nowait, piece)
    return stream


async def _events(p: Parts, job: Job, row, head: dict, kind: str) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: a chunk per piece of text, a last chunk with the finish
    reason, then `[DONE]`; an error after the stream began is an event with an `error` object."""
    chat = kind == "chat.completion"
    timeout_s = p.settings.timeout_s
    deadline = asyncio.get_running_loop().time() + timeout_s

    def event(delta: dict | str, finish: str | None = None) -> str:
        choice = ({"index": 0, "delta": delta, "finish_reason": finish} if chat
                  else {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish})
        chunk = {**head, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [choice]}
        return f"data: {json.dumps(chunk)}\n\n"

    def failure(message: str, code: str) -> str:
        return f"data: {json.dumps({'error': {'message': message, 'code': code}})}\n\n"

    try:
        if chat:
            yield event({"role": "assistant"})
        while True:
            try:
                piece = await asyncio.wait_for(job.stream.get(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                job.cancelled = True
                yield failure(f"the request took longer than {timeout_s:g} s (--timeout) and was stopped", "timeout")
                return
            if piece is DONE:
                break
            yield event({"content": piece} if chat else piece)
        if (e := job.future.exception()) is not None:
            yield failure(str(e), getattr(e, "code", "error"))
            return
        p.metrics.tokens.labels(head["model"]).inc(len(row.new))
        yield event({} if chat else "", row.finish_reason)
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = job.cancelled or not job.future.done()  # the client went away mid-stream


def _check_admin(settings: Settings, request: Request) -> None:
    if not settings.admin_token:
        raise ServeError("adapter management is off: start the server with --admin-token TOKEN to load and "
                         "unload adapters at runtime", 403, "admin_disabled")
    given = request.headers.get("authorization", "")
    if not secrets.compare_digest(given.encode(), f"Bearer {settings.admin_token}".encode()):
        raise ServeError("missing or wrong admin token: send the header `Authorization: Bearer TOKEN`", 401,
                         "unauthorized")


def _admin_routes(app: FastAPI, p: Parts) -> None:
    @app.post("/v1/adapters/{name}", status_code=201)
    async def load_adapter(name: str, body: LoadRequest, request: Request) -> dict:
        _check_admin(p.settings, request)
        registry.check_name(name)
        path = registry.resolve_run(p.settings.allowed_root, body.run_dir)
        card = await p.batcher.exclusive(p.engine.add, name, path, body.merge)
        p.metrics.adapters.set(len(p.engine.served))
        return card

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str, request: Request) -> dict:
        _check_admin(p.settings, request)
        await p.batcher.exclusive(p.engine.remove, name)
        p.metrics.adapters.set(len(p.engine.served))
        return {"id": name, "deleted": True}


def _choice(kind: str, row) -> dict:
    if kind == "chat.completion":
        return {"index": 0, "message": {"role": "assistant", "content": row.text}, "finish_reason": row.finish_reason}
    return {"index": 0, "text": row.text, "logprobs": None, "finish_reason": row.finish_reason}


def _usage(row) -> dict:
    return {"prompt_tokens": len(row.ids), "completion_tokens": len(row.new),
            "total_tokens": len(row.ids) + len(row.new)}


ENDPOINTS = ("/v1/classify", "/v1/completions", "/v1/chat/completions", "/v1/models")


class Observe:
    """Plain ASGI middleware (Starlette's BaseHTTPMiddleware would buffer streams): refuses oversize bodies
    before they are read, and records every /v1/ request's status and time to its last byte, by adapter."""

    def __init__(self, app, settings: Settings, metrics: Metrics, engine: Engine):
        self.app, self.settings, self.metrics, self.engine = app, settings, metrics, engine

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.settings.max_body_bytes:
            response = error_body(f"the request body has {int(length)} bytes, over this server's limit of "
                                  f"{self.settings.max_body_bytes}", 413, "body_too_large")
            return await response(scope, receive, send)
        status = {"code": 500}
        state = scope.setdefault("state", {})  # where request.state.adapter lands
        start = time.perf_counter()

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = scope["path"]
            if path.startswith("/v1/"):  # labels stay bounded, whatever paths and names clients send
                endpoint = path if path in ENDPOINTS else "other"
                endpoint = "/v1/adapters/{name}" if path.startswith("/v1/adapters/") else endpoint
                adapter = state.get("adapter", "-")
                adapter = adapter if adapter in self.engine.served else "-"
                self.metrics.request(endpoint, adapter, status["code"], time.perf_counter() - start)

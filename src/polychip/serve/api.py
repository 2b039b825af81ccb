"""The HTTP layer: an OpenAI-compatible FastAPI app over a running `Engine`.

Module-level handlers over one small `AppState` (app.state.polychip). The engine runs in its own
thread; each request gets an asyncio queue that the engine feeds through
`loop.call_soon_threadsafe`. A client that disconnects (the streaming response is cancelled, or a
non-streaming handler sees `is_disconnected`) cancels its engine request, which frees its KV blocks
at the next engine iteration.

The event loop only awaits: tokenisation (about a second per megabyte) runs on a small thread pool,
so /health and other clients keep being answered while large prompts are tokenised.
"""
from __future__ import annotations

import asyncio
import functools
import json
import os
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from polychip.config import ConfigError
from polychip.infer import RequestError, SamplingParams, check_prompt
from polychip.serve.engine import Engine, QueueFull
from polychip.serve.protocol import ERROR_RESPONSES, GENERATION_OK, APIError, ChatRequest, CompletionRequest, error_body
from polychip.serve.text import TextStream, encode, render_chat, stop_token_ids


@dataclass
class ServerLimits:
    #: Largest accepted request body in bytes (413 beyond).
    max_request_bytes: int = 1 << 20
    #: Largest max_tokens a request may ask for (None: the model's context).
    max_tokens: int | None = None
    #: max_tokens for chat requests that give none (None: what is left of the context).
    default_completion_tokens: int = 16
    #: Threads that tokenise requests off the event loop.
    tokenizer_threads: int = max(1, min(4, os.cpu_count() or 1))


@dataclass
class AppState:
    engine: Engine
    tokenizer: Any
    model_name: str
    api_key: str | None
    limits: ServerLimits
    stop_ids: frozenset[int] = frozenset()
    created: int = field(default_factory=lambda: int(time.time()))
    pool: ThreadPoolExecutor | None = None

    @property
    def ctx(self) -> int:
        return self.engine.max_len

    @property
    def max_tokens_limit(self) -> int:
        return min(self.limits.max_tokens or self.ctx, self.ctx)

    async def off_loop(self, fn, *args):
        """fn(*args) on the tokenizer pool (CPU work must not block the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))


def _state(request: Request) -> AppState:
    return request.app.state.polychip


# ----------------------------------------------------------------------------------------------
# Errors: always OpenAI's shape, never a 5xx for anything a client sends
# ----------------------------------------------------------------------------------------------
def _err(e: APIError) -> Response:
    # json.dumps escapes non-ASCII, so even a message quoting a lone surrogate encodes.
    return Response(json.dumps(e.body()), status_code=e.status, media_type="application/json")


def _from_request_error(e: RequestError) -> APIError:
    return APIError(400, str(e), param=e.param, code=e.code)


async def _on_api_error(request, e: APIError):
    return _err(e)


async def _on_validation(request, e: RequestValidationError):
    errs = e.errors()
    first = errs[0] if errs else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return _err(APIError(400, f"the request body is not valid JSON: {first.get('msg', '')}", code="invalid_json"))
    msg = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
    if len(errs) > 1:
        msg += f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})"
    return _err(APIError(400, msg, param=loc[0] if loc else None, code="invalid_value"))


async def _on_http(request, e: StarletteHTTPException):
    if isinstance(e.__cause__, APIError):  # raised while FastAPI read the body (BodyLimit)
        return _err(e.__cause__)
    return _err(APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None))


async def _on_bug(request, e: Exception):  # a real bug: still answer in OpenAI's shape
    return _err(APIError(500, f"internal error: {type(e).__name__}", type_="server_error"))


class BodyLimit:
    """ASGI middleware: refuse bodies above `limit` bytes with 413, whether or not Content-Length is sent."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > self.limit:
                return await _send_json(send, 413, error_body(f"request body is larger than {self.limit} bytes",
                                                              code="request_too_large"))
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise APIError(413, f"request body is larger than {self.limit} bytes", code="request_too_large")
            return msg

        return await self.app(scope, limited, send)


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class ClientGone(Exception):
    pass


# ----------------------------------------------------------------------------------------------
# Request -> engine
# ----------------------------------------------------------------------------------------------
async def auth(request: Request):
    key = _state(request).api_key
    if key is None:
        return
    got = request.headers.get("authorization", "")
    token = got[7:] if got.lower().startswith("bearer ") else ""
    if not secrets.compare_digest(token.encode(), key.encode()):
        raise APIError(401, "incorrect or missing API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")


def _check_model(st: AppState, name: str) -> None:
    if name != st.model_name:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {st.model_name!r}",
                       param="model", code="model_not_found")


def _sampling(st: AppState, req, prompt: list[int], max_tokens: int | None, default: int) -> SamplingParams:
    """The request's SamplingParams, after the server's own limits (the engine validates the rest)."""
    if req.n != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    if req.logprobs:
        raise APIError(400, "logprobs are not supported", param="logprobs")
    try:
        check_prompt(prompt, st.ctx, st.engine.cfg.vocab_size)
    except RequestError as e:
        raise _from_request_error(e) from None
    n, ctx, limit = len(prompt), st.ctx, st.max_tokens_limit
    if max_tokens is not None and max_tokens > limit:
        raise APIError(400, f"max_tokens={max_tokens} is above this server's limit of {limit}", param="max_tokens")
    if max_tokens is not None and n + max_tokens > ctx:
        raise APIError(400, f"the prompt ({n} tokens) plus max_tokens ({max_tokens}) exceeds the model's context "
                            f"of {ctx} tokens", param="max_tokens", code="context_length_exceeded")
    mt = max_tokens if max_tokens is not None else min(default, ctx - n, limit)
    seed = req.seed if req.seed is not None else secrets.randbits(31)
    top_k = req.top_k if req.top_k and req.top_k > 0 else 0  # OpenAI/vLLM spell "off" as -1 too
    return SamplingParams(temperature=req.temperature, top_k=top_k, top_p=req.top_p, seed=seed, max_tokens=mt)


def _submit(st: AppState, prompt: list[int], sp: SamplingParams, ignore_eos: bool) -> tuple[int, asyncio.Queue]:
    """Queue the request in the engine now (so a full queue is a 429 before any response starts)."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()

    def sink(ev):
        loop.call_soon_threadsafe(q.put_nowait, ev)

    try:
        return st.engine.submit(prompt, sp, sink, frozenset() if ignore_eos else st.stop_ids), q
    except QueueFull as e:
        st.engine.metrics.count_rejected()
        raise APIError(429, str(e), type_="rate_limit_error", code="queue_full") from None
    except RequestError as e:
        raise _from_request_error(e) from None
    except ConfigError as e:
        raise APIError(400, str(e), param="prompt") from None


async def _next_event(q: asyncio.Queue, request: Request | None) -> tuple:
    if request is None:
        return await q.get()
    while True:  # non-streaming: poll for a client that went away
        try:
            return await asyncio.wait_for(q.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ClientGone() from None


async def _run(st: AppState, rid: int, q: asyncio.Queue, stops: list[str], request: Request | None
               ) -> AsyncIterator[tuple[str, str | None, int]]:
    """Yields (text delta, finish_reason or None, completion tokens so far). Leaving early (a stop
    string, an error, a client that went away) cancels the engine request."""
    text = TextStream(st.tokenizer, stops)
    finished = False
    n = 0
    try:
        while True:
            kind, value = await _next_event(q, request)
            if kind == "token":
                n += 1
                delta = text.add(value)
                if text.stopped:
                    yield delta, "stop", n
                    return
                if delta:
                    yield delta, None, n
            elif kind == "done":
                finished = True
                yield text.flush(), ("length" if value == "length" else "stop"), n
                return
            else:
                finished = True
                raise APIError(500, value or "engine error", type_="server_error")
    finally:
        if not finished:
            st.engine.cancel(rid)


# ----------------------------------------------------------------------------------------------
# Responses
# ----------------------------------------------------------------------------------------------
def _usage(prompt_len: int, n: int) -> dict:
    return {"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n}


@dataclass
class _Reply:
    """What one response needs to know about its request."""

    st: AppState
    req: Any
    prompt: list[int]
    chat: bool
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def body(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.st.model_name,
                "choices": choices, **extra}

    def chunk(self, delta: str | None, fin: str | None, role: bool = False, include_usage: bool = False) -> str:
        if self.chat:
            d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
            c = {"index": 0, "delta": d, "logprobs": None, "finish_reason": fin}
        else:
            c = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": fin}
        body = self.body("chat.completion.chunk" if self.chat else "text_completion", [c])
        if include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"


async def _respond(r: _Reply, sp: SamplingParams, stops: list[str], request: Request):
    handle, q = _submit(r.st, r.prompt, sp, r.req.ignore_eos)
    if r.req.stream:
        return StreamingResponse(_events(r, _run(r.st, handle, q, stops, None)), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    parts, reason, n = [], "stop", 0
    try:
        async for delta, fin, n in _run(r.st, handle, q, stops, request):
            parts.append(delta)
            reason = fin or reason
    except ClientGone:
        return _err(APIError(499, "client disconnected"))
    text = "".join(parts)
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
               "finish_reason": reason} if r.chat else
              {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
    return r.body("chat.completion" if r.chat else "text_completion", [choice], usage=_usage(len(r.prompt), n))


async def _events(r: _Reply, agen) -> AsyncIterator[str]:
    include_usage = bool(r.req.stream_options and r.req.stream_options.include_usage)
    n = 0
    try:
        if r.chat:
            yield r.chunk(None, None, role=True, include_usage=include_usage)
        async for delta, fin, n in agen:
            if delta or fin:
                yield r.chunk(delta, fin, include_usage=include_usage)
            if fin:
                break
        if include_usage:
            obj = "chat.completion.chunk" if r.chat else "text_completion"
            yield f"data: {json.dumps(r.body(obj, [], usage=_usage(len(r.prompt), n)))}\n\n"
    except APIError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:
        await agen.aclose()  # cancels the engine request when the client went away
    yield "data: [DONE]\n\n"


# ----------------------------------------------------------------------------------------------
# Routes
# ----------------------------------------------------------------------------------------------
async def _tokenize(st: AppState, fn, *args):
    try:
        return await st.off_loop(fn, *args)
    except RequestError as e:
        raise _from_request_error(e) from None


async def completions(req: CompletionRequest, request: Request):
    st = _state(request)
    _check_model(st, req.model)
    if req.echo:
        raise APIError(400, "echo is not supported", param="echo")
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    p = req.prompt
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        if len(p) != 1:
            raise APIError(400, "only one prompt per request is supported", param="prompt")
        p = p[0]
    ids = await _tokenize(st, encode, st.tokenizer, p) if isinstance(p, str) else list(p)
    sp = _sampling(st, req, ids, req.max_tokens, st.limits.default_completion_tokens)
    return await _respond(_Reply(st, req, ids, chat=False), sp, req.stop_list(), request)


async def chat_completions(req: ChatRequest, request: Request):
    st = _state(request)
    _check_model(st, req.model)
    msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
    ids, extra_stops = await _tokenize(st, render_chat, st.tokenizer, msgs)
    mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    sp = _sampling(st, req, ids, mt, st.ctx)
    return await _respond(_Reply(st, req, ids, chat=True), sp, req.stop_list() + extra_stops, request)


async def models(request: Request):
    st = _state(request)
    return {"object": "list", "data": [{"id": st.model_name, "object": "model", "created": st.created,
                                        "owned_by": "polychip", "max_model_len": st.ctx}]}


async def health(request: Request):
    body = _state(request).engine.health()
    return Response(json.dumps(body), status_code=200 if body["status"] == "ok" else 503,
                    media_type="application/json")


async def metrics(request: Request):
    return PlainTextResponse(_state(request).engine.metrics.render(), media_type="text/plain; version=0.0.4")


def _openapi(app: FastAPI) -> dict:
    """The schema names the one model this server serves (the code still answers 404 for others)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for name in ("CompletionRequest", "ChatRequest"):
            doc["components"]["schemas"][name]["properties"]["model"]["enum"] = [app.state.polychip.model_name]
        app.openapi_schema = doc
    return app.openapi_schema


def build_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None,
              limits: ServerLimits | None = None) -> FastAPI:
    limits = limits or ServerLimits()
    app = FastAPI(title="polychip serve", version="0.1.0",
                  description="OpenAI-compatible completions and chat completions over polychip's paged-KV engine.")
    app.state.polychip = AppState(engine, tokenizer, model_name, api_key, limits, stop_token_ids(tokenizer),
                                  pool=ThreadPoolExecutor(limits.tokenizer_threads, thread_name_prefix="polychip-tok"))
    app.state.engine = engine
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_bug)
    gen = {"dependencies": [Depends(auth)], "responses": {**GENERATION_OK, **ERROR_RESPONSES}, "methods": ["POST"]}
    app.add_api_route("/v1/completions", completions, **gen)
    app.add_api_route("/v1/chat/completions", chat_completions, **gen)
    app.add_api_route("/v1/models", models, methods=["GET"], dependencies=[Depends(auth)], responses=ERROR_RESPONSES)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"], response_class=PlainTextResponse)
    app.openapi = functools.partial(_openapi, app)
    app.add_middleware(BodyLimit, limit=limits.max_request_bytes)
    return app

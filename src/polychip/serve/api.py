"""The HTTP layer: an OpenAI-compatible FastAPI app over a running `Engine`.

The engine runs in its own thread; each request gets an asyncio queue that the engine feeds
through `loop.call_soon_threadsafe`. A client that disconnects (the streaming response is
cancelled, or a non-streaming handler sees `is_disconnected`) cancels its engine request, which
frees its KV blocks at the next engine iteration.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from polychip.config import ConfigError
from polychip.serve.engine import Engine, QueueFull, Sampling
from polychip.serve.protocol import ERROR_RESPONSES, GENERATION_OK, APIError, ChatRequest, CompletionRequest, error_body
from polychip.serve.text import TextStream, render_chat, stop_token_ids


@dataclass
class ServerLimits:
    #: Largest accepted request body in bytes (413 beyond).
    max_request_bytes: int = 1 << 20
    #: Largest max_tokens a request may ask for (None: the model's context).
    max_tokens: int | None = None
    #: max_tokens for chat requests that give none (None: what is left of the context).
    default_completion_tokens: int = 16


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


def _err(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class ClientGone(Exception):
    pass


def build_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None,
              limits: ServerLimits | None = None) -> FastAPI:
    limits = limits or ServerLimits()
    ctx = engine.max_len
    max_tokens_limit = min(limits.max_tokens or ctx, ctx)
    stop_ids = stop_token_ids(tokenizer)
    created = int(time.time())
    app = FastAPI(title="polychip serve", version="0.1.0",
                  description="OpenAI-compatible completions and chat completions over polychip's paged-KV engine.")
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return _err(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return _err(APIError(400, f"the request body is not valid JSON: {first.get('msg', '')}", code="invalid_json"))
        msg = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''})"
        return _err(APIError(400, msg, param=loc[0] if loc else None, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        if isinstance(e.__cause__, APIError):  # raised while FastAPI read the body (BodyLimit)
            return _err(e.__cause__)
        return _err(APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):  # a real bug: still answer in OpenAI's shape
        return _err(APIError(500, f"internal error: {type(e).__name__}", type_="server_error"))

    async def auth(request: Request):
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        token = got[7:] if got.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), api_key.encode()):
            raise APIError(401, "incorrect or missing API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def sampling_for(req, prompt_len: int, max_tokens: int | None, default: int) -> Sampling:
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        if req.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if prompt_len == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        if prompt_len >= ctx:
            raise APIError(400, f"the prompt is {prompt_len} tokens; this model's context is {ctx} tokens",
                           param="prompt", code="context_length_exceeded")
        if max_tokens is not None and max_tokens > max_tokens_limit:
            raise APIError(400, f"max_tokens={max_tokens} is above this server's limit of {max_tokens_limit}",
                           param="max_tokens")
        if max_tokens is not None and prompt_len + max_tokens > ctx:
            raise APIError(400, f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the "
                                f"model's context of {ctx} tokens", param="max_tokens", code="context_length_exceeded")
        mt = max_tokens if max_tokens is not None else min(default, ctx - prompt_len, max_tokens_limit)
        seed = req.seed if req.seed is not None else secrets.randbits(31)
        top_k = req.top_k if req.top_k and req.top_k > 0 else 0
        return Sampling(temperature=req.temperature, top_k=top_k, top_p=req.top_p, seed=seed % (2 ** 31),
                        max_tokens=mt)

    def submit(prompt: list[int], sp: Sampling, ignore_eos: bool) -> tuple[int, asyncio.Queue]:
        """Queue the request in the engine now (so a full queue is a 429 before any response starts)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def sink(ev):
            loop.call_soon_threadsafe(q.put_nowait, ev)

        try:
            return engine.submit(prompt, sp, sink, frozenset() if ignore_eos else stop_ids), q
        except QueueFull as e:
            engine.metrics.count_rejected()
            raise APIError(429, str(e), type_="rate_limit_error", code="queue_full") from None
        except ConfigError as e:
            raise APIError(400, str(e), param="prompt") from None

    async def run(rid: int, q: asyncio.Queue, stops: list[str], request: Request | None
                  ) -> AsyncIterator[tuple[str, str | None, int]]:
        """Yields (text delta, finish_reason or None, completion tokens so far). Leaving early (a stop
        string, an error, a client that went away) cancels the engine request."""
        text = TextStream(tokenizer, stops)
        finished = False
        n = 0
        try:
            while True:
                if request is None:
                    ev = await q.get()
                else:  # non-streaming: poll for a client that went away
                    try:
                        ev = await asyncio.wait_for(q.get(), timeout=0.5)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            raise ClientGone() from None
                        continue
                kind = ev[0]
                if kind == "token":
                    n += 1
                    delta = text.add(ev[1])
                    if text.stopped:
                        yield delta, "stop", n
                        return
                    if delta:
                        yield delta, None, n
                elif kind == "done":
                    finished = True
                    yield text.flush(), ("length" if ev[1] == "length" else "stop"), n
                    return
                else:
                    finished = True
                    raise APIError(500, ev[1] or "engine error", type_="server_error")
        finally:
            if not finished:
                engine.cancel(rid)

    def usage(prompt_len: int, n: int) -> dict:
        return {"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n}

    async def respond(req, prompt: list[int], sp: Sampling, stops: list[str], request: Request, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        obj = "chat.completion" if chat else "text_completion"
        now = int(time.time())
        handle, q = submit(prompt, sp, req.ignore_eos)
        if not req.stream:
            parts, reason, n = [], "stop", 0
            try:
                async for delta, fin, n in run(handle, q, stops, request):
                    parts.append(delta)
                    reason = fin or reason
            except ClientGone:
                return JSONResponse(error_body("client disconnected"), status_code=499)
            text = "".join(parts)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                       "finish_reason": reason} if chat else
                      {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
            return {"id": rid, "object": obj, "created": now, "model": model_name, "choices": [choice],
                    "usage": usage(len(prompt), n)}

        agen = run(handle, q, stops, None)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, fin: str | None, role: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
                c = {"index": 0, "delta": d, "logprobs": None, "finish_reason": fin}
            else:
                c = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": fin}
            body = {"id": rid, "object": obj, "created": now, "model": model_name, "choices": [c]}
            if include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        async def events():
            n = 0
            try:
                if chat:
                    yield chunk(None, None, role=True)
                async for delta, fin, n in agen:
                    if delta or fin:
                        yield chunk(delta, fin)
                    if fin:
                        break
                if include_usage:
                    body = {"id": rid, "object": obj, "created": now, "model": model_name, "choices": [],
                            "usage": usage(len(prompt), n)}
                    yield f"data: {json.dumps(body)}\n\n"
            except APIError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
            finally:
                await agen.aclose()  # cancels the engine request when the client went away
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions", dependencies=[Depends(auth)], responses={**GENERATION_OK, **ERROR_RESPONSES})
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        p = req.prompt
        if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            if len(p) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            p = p[0]
        ids = tokenizer.encode(p).ids if isinstance(p, str) else list(p)
        if any(t < 0 or t >= engine.cfg.vocab_size for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {engine.cfg.vocab_size})", param="prompt")
        sp = sampling_for(req, len(ids), req.max_tokens, limits.default_completion_tokens)
        return await respond(req, ids, sp, req.stop_list(), request, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)], responses={**GENERATION_OK, **ERROR_RESPONSES})
    async def chat_completions(req: ChatRequest, request: Request):
        check_model(req.model)
        ids, extra_stops = render_chat(tokenizer, [{"role": m.role, "content": m.text()} for m in req.messages])
        mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        sp = sampling_for(req, len(ids), mt, ctx)
        return await respond(req, ids, sp, req.stop_list() + extra_stops, request, chat=True)

    @app.get("/v1/models", dependencies=[Depends(auth)], responses=ERROR_RESPONSES)
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "polychip", "max_model_len": ctx}]}

    @app.get("/health")
    async def health():
        alive = engine._thread is not None and engine._thread.is_alive()
        body = {"status": "ok" if alive else "engine stopped", **engine.stats()}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    def openapi():
        # The schema names the one model this server serves (the code still answers 404 for others).
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for name in ("CompletionRequest", "ChatRequest"):
                doc["components"]["schemas"][name]["properties"]["model"]["enum"] = [model_name]
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(BodyLimit, limit=limits.max_request_bytes)
    return app

"""The HTTP layer: an OpenAI-compatible FastAPI app over a running `Engine`.

Module-level handlers over one small `AppState` (app.state.polychip); the generation routes are in
completions.py, the rest (models, health, metrics, vLLM's tokenizer routes) here. The engine runs in its own
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
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from polychip.infer import GenerationConfig, builtin_generation_config
from polychip.serve.completions import chat_completions, completions, tokenize
from polychip.serve.engine import Engine
from polychip.serve.profile import ProfileBusy
from polychip.serve.protocol import (ERROR_RESPONSES, GENERATION_OK, APIError, DetokenizeRequest, TokenizeRequest,
                                     error_body)
from polychip.serve.text import encode


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
    gcfg: GenerationConfig
    created: int = field(default_factory=lambda: int(time.time()))
    pool: ThreadPoolExecutor | None = None
    #: Where POST /admin/profile writes traces (None: a temporary folder, made at the first capture).
    profile_dir: Path | None = None

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


async def auth(request: Request):
    key = _state(request).api_key
    if key is None:
        return
    got = request.headers.get("authorization", "")
    token = got[7:] if got.lower().startswith("bearer ") else ""
    if not secrets.compare_digest(token.encode(), key.encode()):
        raise APIError(401, "incorrect or missing API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")


# ----------------------------------------------------------------------------------------------
# Routes (the generation routes are in completions.py)
# ----------------------------------------------------------------------------------------------
async def tokenize_route(req: TokenizeRequest, request: Request):
    """vLLM's /tokenize (lm-evaluation-harness's remote tokenizer uses it)."""
    st = _state(request)
    ids = await tokenize(st, encode, st.tokenizer, req.prompt, "prompt", req.add_special_tokens)
    return {"tokens": ids, "count": len(ids), "max_model_len": st.ctx}


async def detokenize_route(req: DetokenizeRequest, request: Request):
    st = _state(request)
    if any(t < 0 or t >= st.engine.cfg.vocab_size for t in req.tokens):
        raise APIError(400, f"token ids must be in [0, {st.engine.cfg.vocab_size})", param="tokens")
    return {"prompt": st.tokenizer.decode(req.tokens, skip_special_tokens=False)}


async def tokenizer_info(request: Request):
    """vLLM's /tokenizer_info: the special tokens and chat template a client-side tokenizer needs."""
    st = _state(request)
    g, tok = st.gcfg, st.tokenizer
    eos = g.eos_token or next((tok.id_to_token(i) for i in sorted(g.eos_ids)), None)
    return {"eos_token": eos, "bos_token": g.bos_token or None, "pad_token": None, "chat_template": g.chat_template,
            "model_max_length": st.ctx, "vocab_size": st.engine.cfg.vocab_size}


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


async def start_profile(request: Request, steps: int = 8):
    """Capture a jax.profiler trace of the engine's next `steps` steps; answers with the folder at once
    (GET /admin/profile reports when the trace is written)."""
    st = _state(request)
    if st.profile_dir is None:
        st.profile_dir = Path(tempfile.mkdtemp(prefix="polychip-serve-profile-"))
    try:
        path = await st.off_loop(st.engine.profile.start, st.profile_dir, steps)
    except ValueError as e:
        raise APIError(400, str(e), param="steps", code="invalid_value") from None
    except ProfileBusy as e:
        raise APIError(409, str(e), code="profile_running") from None
    except Exception as e:  # the profiler could not start (another trace in this process, unwritable folder)
        raise APIError(503, f"could not start the profiler: {type(e).__name__}: {e}", type_="server_error") from None
    return {"path": str(path), "steps": steps, "status": "capturing"}


async def profile_status(request: Request):
    return _state(request).engine.profile.status()


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
              limits: ServerLimits | None = None, gcfg: GenerationConfig | None = None,
              profile_dir: Path | None = None) -> FastAPI:
    """The app; `gcfg` (infer.load_generation_config) defaults to a polychip run folder's rules;
    `profile_dir` is where /admin/profile writes traces (default: a temporary folder)."""
    limits = limits or ServerLimits()
    app = FastAPI(title="polychip serve", version="0.1.0",
                  description="OpenAI-compatible completions and chat completions over polychip's paged-KV engine.")
    app.state.polychip = AppState(engine, tokenizer, model_name, api_key, limits,
                                  gcfg or builtin_generation_config(tokenizer),
                                  pool=ThreadPoolExecutor(limits.tokenizer_threads, thread_name_prefix="polychip-tok"),
                                  profile_dir=profile_dir)
    app.state.engine = engine
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_bug)
    gen = {"dependencies": [Depends(auth)], "responses": {**GENERATION_OK, **ERROR_RESPONSES}, "methods": ["POST"]}
    app.add_api_route("/v1/completions", completions, **gen)
    app.add_api_route("/v1/chat/completions", chat_completions, **gen)
    app.add_api_route("/v1/models", models, methods=["GET"], dependencies=[Depends(auth)], responses=ERROR_RESPONSES)
    app.add_api_route("/tokenize", tokenize_route, methods=["POST"], dependencies=[Depends(auth)],
                      responses=ERROR_RESPONSES)
    app.add_api_route("/detokenize", detokenize_route, methods=["POST"], dependencies=[Depends(auth)],
                      responses=ERROR_RESPONSES)
    app.add_api_route("/tokenizer_info", tokenizer_info, methods=["GET"], dependencies=[Depends(auth)])
    app.add_api_route("/admin/profile", start_profile, methods=["POST"], dependencies=[Depends(auth)],
                      responses=ERROR_RESPONSES)
    app.add_api_route("/admin/profile", profile_status, methods=["GET"], dependencies=[Depends(auth)])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"], response_class=PlainTextResponse)
    app.openapi = functools.partial(_openapi, app)
    app.add_middleware(BodyLimit, limit=limits.max_request_bytes)
    return app

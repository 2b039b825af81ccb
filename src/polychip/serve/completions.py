"""/v1/completions and /v1/chat/completions: request -> engine requests -> one response or an SSE stream.

One request may hold several prompts (a list of texts or of token-id lists) and n choices per
prompt; every choice is its own engine request (seeds seed, seed+1, ...), submitted before the
response starts so a full queue is a 429, and cancelled when the client goes away. Choice i*n + j
is prompt i's j-th. `echo` scores the prompt with one full forward pass (Engine.score).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from polychip.config import ConfigError
from polychip.infer import RequestError, SamplingParams, check_prompt
from polychip.serve.engine import QueueFull
from polychip.serve.logprobs import chat_logprobs, completion_logprobs, merge_completion
from polychip.serve.protocol import MAX_CHOICES, APIError, ChatRequest, CompletionRequest
from polychip.serve.text import TextStream, encode_prompt, render_chat


class ClientGone(Exception):
    pass


def from_request_error(e: RequestError) -> APIError:
    return APIError(400, str(e), param=e.param, code=e.code)


def check_model(st, name: str) -> None:
    if name != st.model_name:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {st.model_name!r}",
                       param="model", code="model_not_found")


async def tokenize(st, fn, *args):
    try:
        return await st.off_loop(fn, *args)
    except RequestError as e:
        raise from_request_error(e) from None


# ----------------------------------------------------------------------------------------------
# Request -> engine
# ----------------------------------------------------------------------------------------------
def sampling(st, req, prompt: list[int], max_tokens: int | None, default: int, logprobs: int | None
             ) -> SamplingParams:
    """The request's SamplingParams for one prompt, after the server's own limits and the model's
    defaults (the engine validates the rest)."""
    try:
        check_prompt(prompt, st.ctx, st.engine.cfg.vocab_size)
    except RequestError as e:
        raise from_request_error(e) from None
    n, ctx, limit = len(prompt), st.ctx, st.max_tokens_limit
    if max_tokens is not None and max_tokens > limit:
        raise APIError(400, f"max_tokens={max_tokens} is above this server's limit of {limit}", param="max_tokens")
    if max_tokens is not None and n + max_tokens > ctx:
        raise APIError(400, f"the prompt ({n} tokens) plus max_tokens ({max_tokens}) exceeds the model's context "
                            f"of {ctx} tokens", param="max_tokens", code="context_length_exceeded")
    mt = max_tokens if max_tokens is not None else min(default, ctx - n, limit)
    seed = req.seed if req.seed is not None else secrets.randbits(31)
    g = st.gcfg
    top_k = g.default("top_k", req.top_k, 0)
    return SamplingParams(temperature=g.default("temperature", req.temperature, 1.0),
                          top_k=top_k if top_k and top_k > 0 else 0,  # OpenAI/vLLM spell "off" as -1 too
                          top_p=g.default("top_p", req.top_p, 1.0), seed=seed, max_tokens=mt, logprobs=logprobs)


def _stop_ids(st, req) -> frozenset[int]:
    extra = frozenset(req.stop_token_ids or ())
    return extra if req.ignore_eos else st.gcfg.eos_ids | extra


def submit(st, jobs: list[tuple[list[int], SamplingParams]], stop_ids: frozenset[int]) -> list[tuple[int, Any]]:
    """Queue every choice in the engine now; [(engine id, asyncio queue)]. All or none: a refusal
    cancels the choices already queued."""
    loop = asyncio.get_running_loop()
    out: list[tuple[int, Any]] = []
    try:
        for prompt, sp in jobs:
            q: asyncio.Queue = asyncio.Queue()
            sink = (lambda q: lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev))(q)
            out.append((st.engine.submit(prompt, sp, sink, stop_ids), q))
    except (QueueFull, ConfigError) as e:
        for rid, _ in out:
            st.engine.cancel(rid)
        if isinstance(e, QueueFull):
            st.engine.metrics.count_rejected()
            raise APIError(429, str(e), type_="rate_limit_error", code="queue_full") from None
        if isinstance(e, RequestError):
            raise from_request_error(e) from None
        raise APIError(400, str(e), param="prompt") from None
    return out


async def _next_event(q: asyncio.Queue, request: Request | None) -> tuple:
    if request is None:
        return await q.get()
    while True:  # non-streaming: poll for a client that went away
        try:
            return await asyncio.wait_for(q.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ClientGone() from None


async def run(st, rid: int, q: asyncio.Queue, stops: list[str], request: Request | None
              ) -> AsyncIterator[tuple[str, str | None, list[tuple[int, Any]]]]:
    """Yields (text delta, finish_reason or None, [(token id, logprobs)] since the last yield). Leaving
    early (a stop string, an error, a client that went away) cancels the engine request."""
    text = TextStream(st.tokenizer, stops)
    finished = False
    pending: list[tuple[int, Any]] = []
    try:
        while True:
            ev = await _next_event(q, request)
            if ev[0] == "token":
                pending.append((ev[1], ev[2]))
                delta = text.add(ev[1])
                if text.stopped:
                    yield delta, "stop", pending
                    return
                if delta:
                    yield delta, None, pending
                    pending = []
            elif ev[0] == "done":
                finished = True
                yield text.flush(), ("length" if ev[1] == "length" else "stop"), pending
                return
            else:
                finished = True
                raise APIError(500, ev[1] or "engine error", type_="server_error")
    finally:
        if not finished:
            st.engine.cancel(rid)


# ----------------------------------------------------------------------------------------------
# Responses
# ----------------------------------------------------------------------------------------------
def usage(prompt_tokens: int, n: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}


@dataclass
class Choice:
    index: int
    prompt: list[int]
    prefix: str = ""  # echo: the prompt's text, returned before the completion
    prefix_logprobs: dict | None = None  # echo + logprobs: the prompt's, in the completions shape
    offset: int = 0  # text_offset of the next token
    tokens: int = 0  # completion tokens so far


@dataclass
class Reply:
    """What one response needs to know about its request."""

    st: Any
    req: Any
    prompts: list[list[int]]
    chat: bool
    logprobs: int | None  # alternatives per token, or None: no log-probabilities
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    @property
    def obj(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def body(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.st.model_name,
                "choices": choices, **extra}

    def usage(self, choices: list[Choice]) -> dict:
        return usage(sum(len(p) for p in self.prompts), sum(c.tokens for c in choices))

    def logprobs_of(self, c: Choice, toks: list[tuple[int, Any]]) -> dict | None:
        if self.logprobs is None:
            return None
        ids, lps = [t for t, _ in toks], [lp for _, lp in toks]
        if self.chat:
            return chat_logprobs(self.st.tokenizer, ids, lps)
        lp, c.offset = completion_logprobs(self.st.tokenizer, ids, lps, c.offset)
        return lp

    def choice(self, c: Choice, text: str, fin: str | None, lp: dict | None, stream: bool) -> dict:
        if not self.chat:
            return {"index": c.index, "text": text, "logprobs": lp, "finish_reason": fin}
        msg = ({"content": text} if text else {}) if stream else {"role": "assistant", "content": text}
        return {"index": c.index, "delta" if stream else "message": msg, "logprobs": lp, "finish_reason": fin}

    def chunk(self, c: Choice, delta: str, fin: str | None, lp: dict | None) -> str:
        body = self.body(self.obj + ".chunk" if self.chat else self.obj, [self.choice(c, delta, fin, lp, True)])
        if self.req.stream_options and self.req.stream_options.include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"


async def _echo(r: Reply, c: Choice) -> None:
    """Fill c.prefix (and c.prefix_logprobs) for an echo request."""
    tok = r.st.tokenizer
    c.prefix = tok.decode(c.prompt, skip_special_tokens=False)
    if r.logprobs is not None:
        scores = await r.st.off_loop(r.st.engine.score, c.prompt, r.logprobs)
        c.prefix_logprobs, c.offset = completion_logprobs(tok, c.prompt, scores)
    else:
        c.offset = len(c.prefix)


async def _collect(r: Reply, c: Choice, rid: int, q, stops: list[str], request: Request) -> dict:
    parts, reason, toks = [c.prefix], "stop", []
    async for delta, fin, new in run(r.st, rid, q, stops, request):
        parts.append(delta)
        toks += new
        reason = fin or reason
    c.tokens = len(toks)
    lp = r.logprobs_of(c, toks)
    if c.prefix_logprobs is not None:
        lp = merge_completion(c.prefix_logprobs, lp)
    return r.choice(c, "".join(parts), reason, lp, stream=False)


async def respond(r: Reply, jobs: list[tuple[list[int], SamplingParams]], stops: list[str], request: Request):
    """Submit every choice, then answer with one JSON body or an SSE stream."""
    n = len(jobs) // len(r.prompts)
    choices = [Choice(i, jobs[i][0]) for i in range(len(jobs))]
    if getattr(r.req, "echo", False):
        for c in choices:
            if c.index % n == 0:
                await _echo(r, c)
            else:  # the same prompt as the choice before it
                first = choices[c.index - c.index % n]
                c.prefix, c.prefix_logprobs, c.offset = first.prefix, first.prefix_logprobs, first.offset
    handles = submit(r.st, jobs, _stop_ids(r.st, r.req))
    if r.req.stream:
        gens = [run(r.st, rid, q, stops, None) for rid, q in handles]
        return StreamingResponse(_events(r, choices, gens), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    tasks = [asyncio.ensure_future(_collect(r, c, rid, q, stops, request)) for c, (rid, q) in zip(choices, handles)]
    try:
        bodies = await asyncio.gather(*tasks)
    except ClientGone:
        raise APIError(499, "client disconnected") from None
    finally:
        for t in tasks:
            t.cancel()  # after a failure, the others' cancellation frees their engine requests
    return r.body(r.obj, list(bodies), usage=r.usage(choices))


async def _merge(gens: list) -> AsyncIterator[tuple[int, Any]]:
    """(index, item) from several async generators as items arrive; an error in one is raised here."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i, g):
        try:
            async for x in g:
                await q.put((i, x, None))
        except Exception as e:  # handed to the consumer
            await q.put((i, None, e))
        finally:
            await q.put((i, None, None))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(gens)
        while left:
            i, x, err = await q.get()
            if err is not None:
                raise err
            if x is None:
                left -= 1
            else:
                yield i, x
    finally:
        # A consumer that stopped early (the client went away): cancelling a pump ends its generator
        # inside its await, whose `finally` cancels the engine request; aclose covers any not started.
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for g in gens:
            await g.aclose()


async def _events(r: Reply, choices: list[Choice], gens: list) -> AsyncIterator[str]:
    try:
        for c in choices:
            if r.chat:  # OpenAI's first chat chunk names the role
                role = {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}
                yield f"data: {json.dumps(r.body(r.obj + '.chunk', [role]))}\n\n"
            elif c.prefix:
                yield r.chunk(c, c.prefix, None, c.prefix_logprobs)
        async for i, (delta, fin, toks) in _merge(gens):
            c = choices[i]
            c.tokens += len(toks)
            if delta or fin or (toks and r.logprobs is not None):
                yield r.chunk(c, delta, fin, r.logprobs_of(c, toks))
        if r.req.stream_options and r.req.stream_options.include_usage:
            yield f"data: {json.dumps(r.body(r.obj + '.chunk' if r.chat else r.obj, [], usage=r.usage(choices)))}\n\n"
    except APIError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    yield "data: [DONE]\n\n"


# ----------------------------------------------------------------------------------------------
# Routes
# ----------------------------------------------------------------------------------------------
async def _prompts(st, p) -> list[list[int]]:
    """CompletionRequest.prompt as token-id lists: a text, texts, ids, or lists of ids."""
    if isinstance(p, str):
        p = [p]
    elif not p or isinstance(p[0], int):
        p = [p]
    if not p:
        raise APIError(400, "the prompt list is empty", param="prompt")
    return [await tokenize(st, encode_prompt, st.tokenizer, st.gcfg, x) if isinstance(x, str) else list(x)
            for x in p]


def _check_choices(n_prompts: int, n: int) -> None:
    if n_prompts * n > MAX_CHOICES:
        raise APIError(400, f"{n_prompts} prompts x n={n} is {n_prompts * n} choices; at most {MAX_CHOICES} per "
                            "request", param="n")


def _jobs(st, req, prompts: list[list[int]], max_tokens, default: int, logprobs) -> list:
    jobs = []
    for ids in prompts:
        sp = sampling(st, req, ids, max_tokens, default, logprobs)
        for j in range(req.n):  # n choices of one prompt differ by seed
            jobs.append((ids, dataclasses.replace(sp, seed=sp.seed + j)))
    return jobs


async def completions(req: CompletionRequest, request: Request):
    st = request.app.state.polychip
    check_model(st, req.model)
    req.refuse_unsupported()
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    prompts = await _prompts(st, req.prompt)
    _check_choices(len(prompts), req.n)
    jobs = _jobs(st, req, prompts, req.max_tokens, st.limits.default_completion_tokens, req.logprobs)
    return await respond(Reply(st, req, prompts, chat=False, logprobs=req.logprobs), jobs, req.stop_list(), request)


async def chat_completions(req: ChatRequest, request: Request):
    st = request.app.state.polychip
    check_model(st, req.model)
    req.refuse_unsupported()
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    _check_choices(1, req.n)
    msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
    ids, extra_stops = await tokenize(st, render_chat, st.tokenizer, st.gcfg, msgs)
    mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    lp = (req.top_logprobs or 0) if req.logprobs else None
    jobs = _jobs(st, req, [ids], mt, st.ctx, lp)
    return await respond(Reply(st, req, [ids], chat=True, logprobs=lp), jobs, req.stop_list() + extra_stops, request)

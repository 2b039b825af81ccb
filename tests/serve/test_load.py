"""Bounded load on loopback: many concurrent clients, mixed lengths, streaming and not. No errors, every
stream complete, greedy outputs equal to the single-sequence Generator whatever the batch composition,
and every KV block back in the pool at the end. Plus: a client that disconnects is cancelled."""
from __future__ import annotations

import asyncio
import json
import re

import httpx
import numpy as np

from polychip.data.tokenizer import special_ids
from polychip.generate import SamplingParams
from tests.serve.conftest import MODEL, wait_idle

N_CLIENTS = 48
N_REQUESTS = 200


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def _one(client: httpx.AsyncClient, ids: list[int], max_tokens: int, stream: bool) -> tuple[list[int] | str, str]:
    body = {"model": MODEL, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if not stream:
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        c = r.json()["choices"][0]
        return c["text"], c["finish_reason"]
    text, finish, done = [], None, False
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            ev = json.loads(data)
            assert "error" not in ev, ev
            text.append(ev["choices"][0]["text"])
            finish = ev["choices"][0]["finish_reason"] or finish
    assert done, "stream ended without [DONE]"
    return "".join(text), finish


def test_load_parity_and_blocks_returned(served):
    rng = np.random.default_rng(0)
    vocab = served.cfg.vocab_size
    shared = list(rng.integers(3, vocab, size=48))  # a common 3-block prefix: exercises the prefix cache
    jobs = []
    for i in range(N_REQUESTS):
        n = int(rng.integers(1, 100))
        ids = (shared + list(rng.integers(3, vocab, size=n)))[:110] if i % 4 == 0 else list(rng.integers(3, vocab, size=n))
        mt = int(min(rng.integers(1, 25), served.cfg.max_seq_len - len(ids)))
        jobs.append(([int(x) for x in ids], mt, bool(i % 2)))
    # The first 12 requests are checked against the single-sequence Generator; they run among all the others.
    eos = special_ids(served.tok).get("eos")
    expected = []
    for ids, mt, _ in jobs[:12]:
        out, reason = served.generator.generate_ids(ids, SamplingParams(temperature=0, max_tokens=mt), eos_id=eos)
        expected.append((served.tok.decode(out), "length" if reason == "length" else "stop"))
    before = httpx.get(served.url + "/metrics").text

    async def main():
        sem = asyncio.Semaphore(N_CLIENTS)
        limits = httpx.Limits(max_connections=N_CLIENTS, max_keepalive_connections=N_CLIENTS)
        async with httpx.AsyncClient(base_url=served.url, timeout=60, limits=limits) as client:
            async def run(job):
                async with sem:
                    return await _one(client, *job)

            return await asyncio.wait_for(asyncio.gather(*(run(j) for j in jobs)), timeout=100)

    results = asyncio.run(main())
    assert len(results) == N_REQUESTS
    for (text, fin), (ids, mt, _) in zip(results, jobs):
        assert fin in ("stop", "length")
    assert results[:12] == expected
    assert wait_idle(served.engine), served.engine.stats()
    st = served.engine.stats()
    assert st["kv_blocks_in_use"] == 0 and st["kv_all_returned"]
    after = httpx.get(served.url + "/metrics").text
    assert _metric(after, "polychip:prefix_cache_hits_total") > _metric(before, "polychip:prefix_cache_hits_total")
    assert _metric(after, "polychip:kv_cache_usage_perc") == 0.0
    done = sum(_metric(after, f'polychip:request_success_total{{finished_reason="{r}"}}') -
               _metric(before, f'polychip:request_success_total{{finished_reason="{r}"}}') for r in ("stop", "length"))
    assert done == N_REQUESTS
    # Every shape the engine ran was compiled at start-up: the jit cache holds exactly the buckets.
    assert served.engine.runner.step._cache_size() == len(served.engine.compiled)


def test_disconnect_cancels_and_frees_blocks(served):
    name = 'polychip:request_success_total{finished_reason="cancelled"}'
    before = _metric(httpx.get(served.url + "/metrics").text, name)
    ids = served.tok.encode("A long story:").ids
    body = {"model": MODEL, "prompt": ids, "max_tokens": served.cfg.max_seq_len - len(ids), "temperature": 0,
            "stream": True}
    with httpx.Client(base_url=served.url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # one token seen: walk away
    assert wait_idle(served.engine), served.engine.stats()
    assert served.engine.pool.all_returned()
    assert _metric(httpx.get(served.url + "/metrics").text, name) == before + 1

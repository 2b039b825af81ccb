"""The Prometheus metrics under load, the Grafana dashboard's queries against what /metrics exposes, and
profile capture through /admin/profile."""
from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.serve.conftest import MODEL, ServerThread, wait_idle

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "polychip-serve.json"


def _samples(text: str) -> dict[str, float]:
    """{sample name with labels: value}, parsed by Prometheus' own client parser (so the exposition is valid)."""
    parser = pytest.importorskip("prometheus_client.parser")
    out = {}
    for fam in parser.text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def _scrape(served) -> dict[str, float]:
    return _samples(httpx.get(served.url + "/metrics").text)


def _delta(after: dict, before: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def test_dashboard_queries_only_exposed_metrics(served):
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"polychip:[a-z0-9_]+", e)}
    exposed = {name.split("{")[0] for name in _scrape(served)}
    assert used - exposed == set()
    for h in ("time_to_first_token_seconds", "time_per_output_token_seconds", "request_queue_time_seconds"):
        assert any(f"histogram_quantile(0.99, sum by (le) (rate(polychip:{h}_bucket" in e for e in exprs), h
    for m in ("polychip:kv_cache_usage_perc", "polychip:num_requests_running", "polychip:num_requests_waiting",
              "polychip:prefix_cache_hits_total", "polychip:prefix_cache_queries_total",
              "polychip:generation_tokens_total"):
        assert m in used, m


def test_metrics_move_under_load(served):
    rng = np.random.default_rng(15)
    repeated = [int(x) for x in rng.integers(3, served.cfg.vocab_size, size=40)]  # 2 full blocks of 16
    prompts = [repeated] * 5 + [[int(x) for x in rng.integers(3, served.cfg.vocab_size, size=n)] for n in (5, 23, 9)]
    assert wait_idle(served.engine)
    before = _scrape(served)

    async def main():
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as c:
            async def one(ids):
                r = await c.post("/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 6,
                                                          "temperature": 0})
                assert r.status_code == 200, r.text
                return r.json()

            first = await one(prompts[0])  # publishes the repeated prompt's blocks to the prefix cache
            return [first] + list(await asyncio.gather(*(one(p) for p in prompts[1:])))

    results = asyncio.run(main())
    assert wait_idle(served.engine), served.engine.stats()
    after = _scrape(served)
    n = len(prompts)
    finished = sum(_delta(after, before, f'polychip:request_success_total{{finished_reason="{r}"}}')
                   for r in ("stop", "length"))
    assert finished == n
    for h in ("time_to_first_token_seconds", "request_queue_time_seconds", "e2e_request_latency_seconds"):
        assert _delta(after, before, f"polychip:{h}_count") == n, h
        assert _delta(after, before, f"polychip:{h}_sum") > 0, h
        assert _delta(after, before, f'polychip:{h}_bucket{{le="+Inf"}}') == n, h
    gen = [r["usage"]["completion_tokens"] for r in results]
    assert _delta(after, before, "polychip:time_per_output_token_seconds_count") == sum(g > 1 for g in gen)
    assert _delta(after, before, "polychip:generation_tokens_total") == sum(gen)
    assert _delta(after, before, "polychip:prompt_tokens_total") == sum(map(len, prompts))
    assert _delta(after, before, "polychip:prefix_cache_queries_total") == sum(map(len, prompts))
    # 4 repeats x 2 full blocks (the last prompt token is always recomputed, so the 40-token prompt reuses 32).
    assert _delta(after, before, "polychip:prefix_cache_hits_total") >= 4 * 32
    assert after["polychip:num_preemptions_total"] == 0
    assert after["polychip:num_requests_running"] == 0 and after["polychip:num_requests_waiting"] == 0
    assert after["polychip:kv_cache_usage_perc"] == 0.0


def test_profile_capture(served, tmp_path):
    folder = tmp_path / "prof"
    srv = ServerThread(served.app_factory(api_key="k", profile_dir=folder))
    auth = {"Authorization": "Bearer k"}
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert c.post("/admin/profile?steps=2").status_code == 401
            for bad in ("0", "1001", "two"):
                r = c.post(f"/admin/profile?steps={bad}", headers=auth)
                assert r.status_code == 400, (bad, r.text)
            r = c.post("/admin/profile?steps=2", headers=auth)
            assert r.status_code == 200, r.text
            assert r.json()["path"] == str(folder)
            busy = c.post("/admin/profile?steps=2", headers=auth)
            assert busy.status_code == 409 and "running" in busy.json()["error"]["message"]
            ids = served.tok.encode("Once upon a time").ids
            r = c.post("/v1/completions", headers=auth, json={"model": MODEL, "prompt": ids, "max_tokens": 4,
                                                               "temperature": 0})
            assert r.status_code == 200, r.text
            t0 = time.time()
            while (st := c.get("/admin/profile", headers=auth).json())["active"]:
                assert time.time() - t0 < 60, st
                time.sleep(0.1)
    finally:
        srv.stop()
    xplanes = list(folder.glob("plugins/profile/*/*.xplane.pb"))
    assert xplanes and all(p.stat().st_size > 0 for p in xplanes), list(folder.rglob("*"))
    assert any(p.endswith(".xplane.pb") for p in st["files"])

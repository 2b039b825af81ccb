"""Prometheus text exposition (format 0.0.4) for the server, without a client library.

Names mirror vLLM's (`vllm:time_to_first_token_seconds` -> `polychip:time_to_first_token_seconds`, ...),
so dashboards and alerts written for vLLM carry over by changing the prefix; deploy/grafana/ has one.
Counters and histograms are updated by the engine thread and the HTTP handlers under one lock;
gauges (running/waiting requests, KV-cache use) are read from the engine when /metrics is scraped.
"""
from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass
from typing import Callable

PREFIX = "polychip:"

# Latency buckets in seconds. TTFT and queue time span a compile-free prefill to long queueing; TPOT is
# per token; end-to-end latency adds the whole generation (vLLM's buckets, trimmed).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

HISTOGRAMS = {  # name -> (buckets, HELP)
    "time_to_first_token_seconds": (TTFT_BUCKETS, "Arrival to first generated token, per request."),
    "time_per_output_token_seconds": (TPOT_BUCKETS,
                                      "Mean time between output tokens after the first, per request with 2+ tokens."),
    "request_queue_time_seconds": (TTFT_BUCKETS, "Arrival to admission (time spent waiting for a slot and KV blocks)."),
    "e2e_request_latency_seconds": (E2E_BUCKETS, "Arrival to finish, per request."),
}


@dataclass
class RequestTimes:
    """One finished request's latencies in seconds (None: the request never reached that point)."""

    ttft: float | None = None
    tpot: float | None = None
    queue: float | None = None
    e2e: float | None = None


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1

    def samples(self) -> list[tuple[str, float]]:
        out, cum = [], 0
        for b, c in zip(self.buckets, self.counts):
            cum += c
            out.append((f'_bucket{{le="{_num(b)}"}}', cum))
        return out + [('_bucket{le="+Inf"}', self.count), ("_sum", self.sum), ("_count", self.count)]


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}  # finish reason -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens whose KV was reused
        self.rejected = 0
        self.hist = {name: Histogram(buckets) for name, (buckets, _) in HISTOGRAMS.items()}
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def add_gauge(self, name: str, help_: str, fn: Callable[[], float]) -> None:
        self.gauges[name] = (help_, fn)

    def request_done(self, reason: str, prompt_tokens: int, gen_tokens: int, times: RequestTimes) -> None:
        with self._lock:
            self.requests[reason] = self.requests.get(reason, 0) + 1
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += gen_tokens
            for name, v in (("time_to_first_token_seconds", times.ttft), ("time_per_output_token_seconds", times.tpot),
                            ("request_queue_time_seconds", times.queue), ("e2e_request_latency_seconds", times.e2e)):
                if v is not None:
                    self.hist[name].observe(v)

    def count_rejected(self) -> None:
        with self._lock:
            self.rejected += 1

    def count_prefix_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        with self._lock:
            self.prefix_queries += queried_tokens
            self.prefix_hits += hit_tokens

    def render(self) -> str:
        out: list[str] = []

        def metric(name, kind, help_, samples):
            out.append(f"# HELP {PREFIX}{name} {help_}")
            out.append(f"# TYPE {PREFIX}{name} {kind}")
            out.extend(f"{PREFIX}{name}{labels} {_num(v)}" for labels, v in samples)

        with self._lock:
            metric("request_success_total", "counter", "Finished requests by finish reason (stop, length, cancelled, "
                   "error).", [(f'{{finished_reason="{r}"}}', n) for r, n in sorted(self.requests.items())]
                   or [('{finished_reason="stop"}', 0)])
            metric("requests_rejected_total", "counter", "Requests refused with 429 because the queue was full.",
                   [("", self.rejected)])
            metric("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", [("", self.prompt_tokens)])
            metric("generation_tokens_total", "counter", "Generated tokens of finished requests.",
                   [("", self.generation_tokens)])
            metric("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache at admission.",
                   [("", self.prefix_queries)])
            metric("prefix_cache_hits_total", "counter", "Prompt tokens whose KV blocks came from the prefix cache "
                   "(hit rate: rate(hits) / rate(queries)).", [("", self.prefix_hits)])
            metric("num_preemptions_total", "counter", "Preempted requests. Always 0: the scheduler reserves a "
                   "request's KV blocks at admission and never preempts.", [("", 0)])
            for name, (_, help_) in HISTOGRAMS.items():
                metric(name, "histogram", help_, self.hist[name].samples())
        for name, (help_, fn) in self.gauges.items():
            metric(name, "gauge", help_, [("", fn())])
        return "\n".join(out) + "\n"


def _num(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    return repr(float(v))

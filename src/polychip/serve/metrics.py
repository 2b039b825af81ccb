"""Prometheus text exposition (format 0.0.4) for the server, without a client library.

Counters and histograms are updated by the engine thread and the HTTP handlers under one lock;
gauges (queue depth, KV-cache use) are read from the engine when /metrics is scraped.
"""
from __future__ import annotations

import bisect
import threading
from typing import Callable

# Latency buckets in seconds (TTFT spans compile-free prefill to long queueing; TPOT is per token).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


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


class Metrics:
    PREFIX = "polychip"

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}  # finish reason / http status class -> count
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefix_cache_hit_blocks = 0
        self.rejected = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def add_gauge(self, name: str, help_: str, fn: Callable[[], float]) -> None:
        self.gauges[name] = (help_, fn)

    def request_done(self, reason: str, prompt_tokens: int, gen_tokens: int, ttft: float | None,
                     tpot: float | None) -> None:
        with self._lock:
            self.requests[reason] = self.requests.get(reason, 0) + 1
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += gen_tokens
            if ttft is not None:
                self.ttft.observe(ttft)
            if tpot is not None:
                self.tpot.observe(tpot)

    def count_rejected(self) -> None:
        with self._lock:
            self.rejected += 1

    def count_prefix_hits(self, blocks: int) -> None:
        with self._lock:
            self.prefix_cache_hit_blocks += blocks

    def render(self) -> str:
        p = self.PREFIX
        out: list[str] = []

        def metric(name, kind, help_, samples):
            out.append(f"# HELP {p}_{name} {help_}")
            out.append(f"# TYPE {p}_{name} {kind}")
            for labels, v in samples:
                out.append(f"{p}_{name}{labels} {_num(v)}")

        with self._lock:
            metric("requests_total", "counter", "Finished requests by finish reason (stop, length, cancelled, error).",
                   [(f'{{finish_reason="{r}"}}', n) for r, n in sorted(self.requests.items())] or [("", 0)])
            metric("requests_rejected_total", "counter", "Requests refused with 429 because the queue was full.",
                   [("", self.rejected)])
            metric("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", [("", self.prompt_tokens)])
            metric("generation_tokens_total", "counter", "Generated tokens of finished requests.",
                   [("", self.generation_tokens)])
            metric("prefix_cache_hit_blocks_total", "counter", "KV blocks reused from the prefix cache.",
                   [("", self.prefix_cache_hit_blocks)])
            for name, h, help_ in [("time_to_first_token_seconds", self.ttft, "Arrival to first generated token."),
                                   ("time_per_output_token_seconds", self.tpot,
                                    "Mean time between output tokens after the first, per request.")]:
                samples = []
                cum = 0
                for b, c in zip(h.buckets, h.counts):
                    cum += c
                    samples.append((f'_bucket{{le="{_num(b)}"}}', cum))
                samples.append(('_bucket{le="+Inf"}', h.count))
                samples.append(("_sum", h.sum))
                samples.append(("_count", h.count))
                out.append(f"# HELP {p}_{name} {help_}")
                out.append(f"# TYPE {p}_{name} histogram")
                out.extend(f"{p}_{name}{suffix} {_num(v)}" for suffix, v in samples)
        for name, (help_, fn) in self.gauges.items():
            metric(name, "gauge", help_, [("", fn())])
        return "\n".join(out) + "\n"


def _num(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    return repr(float(v))

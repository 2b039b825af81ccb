"""The serving engine: a thread that drives the scheduler and the runner over a paged KV cache,
with continuous batching, chunked prefill and prefix caching.

    submit()/cancel() (any thread) -> inboxes -> engine thread:
        scheduler.admit()                            which requests start (block manager: kv_cache)
        for kind in (prefill, decode):
            batch = scheduler.schedule(kind)         which rows run, how many tokens each
            tokens = runner.execute(batch)           one jitted step on the device
            scheduler.update(batch, tokens) -> accept each token: emit it, or finish the request

Shapes are bucketed (decode batch sizes; prefill rows and chunk lengths), so the jit cache holds
len(batch_buckets) + len(prefill_row_buckets) x len(chunk_buckets) programs, all compiled by
`warmup()` before serving.

Sinks are called on the engine thread with events ("token", id, logprobs), ("done", finish_reason)
or ("error", message); the HTTP layer forwards them to its event loop. logprobs is None unless the
request asked for them (SamplingParams.logprobs = N): then (log p(id), [N most likely ids], [their
log p]) under the model's unmodified distribution.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from typing import Any, Callable

import numpy as np

from polychip.config import ConfigError, ModelConfig
from polychip.infer import SamplingParams, check_prompt, token_budget
from polychip.kernels.registry import KernelPolicy
from polychip.model import transformer as T
from polychip.serve import paged_model as PM
from polychip.serve.config import EngineConfig
from polychip.serve.kv_cache import BlockPool
from polychip.serve.metrics import Metrics, RequestTimes
from polychip.serve.profile import ProfileCapture
from polychip.serve.runner import ModelRunner, StepOut, kv_blocks_for
from polychip.serve.scheduler import Scheduler, Sequence

__all__ = ["Engine", "EngineConfig", "QueueFull"]

log = logging.getLogger("polychip.serve")


class QueueFull(RuntimeError):
    """The bounded waiting queue is full (the HTTP layer answers 429)."""


def row_logprobs(out: StepOut, i: int, top: int | None) -> tuple | None:
    """(log p of row i's token, its `top` most likely ids, their log p), or None when top is None."""
    if top is None:
        return None
    return float(out.logprob[i]), out.top_ids[i, :top].tolist(), out.top_logprobs[i, :top].tolist()


class Engine:
    def __init__(self, cfg: ModelConfig, params: Any, ecfg: EngineConfig | None = None,
                 policy: KernelPolicy | None = None, metrics: Metrics | None = None):
        self.cfg = cfg
        self.ecfg = ecfg or EngineConfig()
        self.ecfg.validate()
        if self.ecfg.max_model_len and self.ecfg.max_model_len > cfg.max_seq_len:
            raise ConfigError(f"serve: max_model_len {self.ecfg.max_model_len} exceeds the model's context "
                              f"{cfg.max_seq_len}")
        self.max_len = self.ecfg.max_model_len or cfg.max_seq_len
        if cfg.sliding_window and cfg.sliding_window < self.max_len:
            # the paged decode kernel attends to every cached token; a window would need per-row starts
            raise ConfigError(f"serve does not support sliding-window attention yet (window {cfg.sliding_window} "
                              f"< serving length {self.max_len}); lower --max-model-len to the window or use "
                              "`polychip generate` for this model")
        self.metrics = metrics or Metrics()
        rt = T.Runtime(policy or KernelPolicy.create(), None, self.ecfg.compute_dtype)
        n_blocks = kv_blocks_for(cfg, self.ecfg, self.max_len)
        max_pages = PM.pages_for(self.max_len, self.ecfg.page_size)
        if n_blocks - 1 < max_pages:
            log.warning("KV pool of %d blocks cannot hold one sequence of max_model_len %d (%d blocks)", n_blocks - 1,
                        self.max_len, max_pages)
        self.pool = BlockPool(n_blocks, self.ecfg.page_size, self.ecfg.prefix_cache)
        self.runner = ModelRunner(cfg, params, rt, n_blocks, self.ecfg.page_size, self.max_len)
        self.scheduler = Scheduler(self.ecfg, self.pool, self.metrics.count_prefix_lookup)
        self.profile = ProfileCapture()
        self.compiled: list[dict] = []
        self.steps = {"prefill": 0, "decode": 0}

        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: deque[Sequence] = deque()
        self._cancels: set[int] = set()
        self._n_queued = 0  # inbox + waiting (under _lock)
        self._by_id: dict[int, Sequence] = {}
        self._thread: threading.Thread | None = None
        self._stop = False
        self._register_gauges()

    @property
    def params(self) -> Any:
        return self.runner.params

    @property
    def kv_bytes(self) -> int:
        return self.runner.kv_bytes

    def _register_gauges(self) -> None:
        m, sch, pool = self.metrics, self.scheduler, self.pool
        m.add_gauge("num_requests_waiting", "Requests waiting for admission.", lambda: self._n_queued)
        m.add_gauge("num_requests_running", "Requests admitted (prefilling or decoding).", sch.running)
        m.add_gauge("kv_cache_usage_perc", "Fraction of KV blocks held by sequences (1 means 100 percent).",
                    lambda: pool.in_use() / pool.usable)
        m.add_gauge("kv_blocks_total", "Usable KV blocks in the pool.", lambda: pool.usable)
        m.add_gauge("kv_blocks_free", "KV blocks not held by any sequence.", pool.available)
        m.add_gauge("compiled_programs", "Shape buckets compiled at start-up.", lambda: len(self.compiled))

    # ------------------------------------------------------------------------------------------
    # Start-up and shutdown
    # ------------------------------------------------------------------------------------------
    def warmup(self) -> list[dict]:
        """Compile every shape bucket (see ModelRunner.warmup)."""
        self.compiled = self.runner.warmup(self.ecfg)
        return self.compiled

    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="polychip-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.profile.close()

    # ------------------------------------------------------------------------------------------
    # Thread-safe API (any thread)
    # ------------------------------------------------------------------------------------------
    def submit(self, prompt: list[int], sampling: SamplingParams, sink: Callable[[tuple], None],
               stop_ids: frozenset[int] = frozenset()) -> int:
        """Queue a request; returns its id. Raises RequestError (a ConfigError) for an impossible
        request and QueueFull when the waiting queue is at its bound."""
        check_prompt(prompt, self.max_len, self.cfg.vocab_size)
        budget = token_budget(prompt, sampling, self.max_len)
        need = PM.pages_for(len(prompt) + budget, self.ecfg.page_size)
        if need > self.pool.usable:
            raise ConfigError(f"the request needs {need} KV blocks; the pool has {self.pool.usable}")
        t, k, p, seed = sampling.step_values(self.cfg.vocab_size)
        seq = Sequence(next(self._ids), list(prompt), sampling, (t, k, p), budget, stop_ids, sink,
                       key_data=np.asarray(PM.seed_key_data(seed)))
        with self._lock:
            if self._n_queued >= self.ecfg.max_queue:
                raise QueueFull(f"the server's queue is full ({self.ecfg.max_queue} requests waiting); retry later")
            self._n_queued += 1
            self._inbox.append(seq)
            self._wake.notify()
        return seq.id

    def score(self, prompt: list[int], top: int = 0) -> list[tuple | None]:
        """Prompt log-likelihoods, one per prompt token: None for the first (nothing precedes it), then
        (log p(token | prefix), [top most likely ids], [their log p]). Runs on the calling thread."""
        check_prompt(prompt, self.max_len + 1, self.cfg.vocab_size)
        out = self.runner.score(prompt)
        return [None] + [row_logprobs(out, i, top) for i in range(len(prompt) - 1)]

    def cancel(self, seq_id: int) -> None:
        with self._lock:
            self._cancels.add(seq_id)
            self._wake.notify()

    def alive(self) -> bool:
        th = self._thread
        return th is not None and th.is_alive()

    def stats(self) -> dict:
        sch = self.scheduler
        return {"queued": self._n_queued, "prefilling": len(sch.prefilling), "decoding": len(sch.decoding),
                "kv_blocks": self.pool.usable, "kv_blocks_in_use": self.pool.in_use(),
                "kv_all_returned": self.pool.all_returned(), "prefix_cached_blocks": self.pool.cached_blocks(),
                "steps": dict(self.steps)}

    def health(self) -> dict:
        """{"status": "ok" | "engine stopped", **stats()}: what /health reports."""
        return {"status": "ok" if self.alive() else "engine stopped", **self.stats()}

    def idle(self) -> bool:
        with self._lock:
            return not (self._n_queued or self.scheduler.running() or self._inbox or self._cancels)

    # ------------------------------------------------------------------------------------------
    # Engine thread
    # ------------------------------------------------------------------------------------------
    def _take_inboxes(self) -> bool:
        """Wait for work; move new requests to the scheduler and apply cancellations. False: stop."""
        with self._lock:
            while not (self._stop or self._inbox or self._cancels or self.scheduler.has_work()):
                self._wake.wait()
            if self._stop:
                return False
            new, self._inbox = list(self._inbox), deque()
            cancels, self._cancels = self._cancels, set()
        for s in new:
            self._by_id[s.id] = s
            self.scheduler.add(s)
        for sid in cancels:
            s = self._by_id.get(sid)
            if s is not None:
                self._finish(s, "cancelled")
        return True

    def _loop(self) -> None:
        while self._take_inboxes():
            try:
                ran = self._iteration()
            except Exception as e:  # a bug: fail every admitted request rather than hang them
                log.exception("engine step failed")
                for s in list(self.scheduler.prefilling) + list(self.scheduler.decoding):
                    self._finish(s, "error", f"engine error: {type(e).__name__}: {e}")
                self.runner.kv = self.runner.new_pages()
                continue
            if not ran and self.scheduler.waiting:
                # Nothing could run (blocks held by no one?) - avoid a hot spin; admission retries.
                time.sleep(0.001)
        for s in list(self._by_id.values()):
            self._finish(s, "error", "the server is shutting down")

    def _iteration(self) -> bool:
        """Admit, then one prefill step (a chunk of each of up to prefill_rows prompts), then one decode step;
        True when anything ran."""
        admitted = self.scheduler.admit()
        if admitted:
            with self._lock:
                self._n_queued -= len(admitted)
        for s in admitted:
            if s.budget == 0:
                self._finish(s, "length")
        ran = False
        for kind in ("prefill", "decode"):
            batch = self.scheduler.schedule(kind)
            if batch is None:
                continue
            with self.profile.annotation(kind):
                out = self.runner.execute(batch)
            self.steps[kind] += 1
            self.profile.step_done()
            row = {id(s): i for i, s in enumerate(batch.seqs)}
            for s, t in self.scheduler.update(batch, out.tokens, out.key_data):
                emit, reason = self.scheduler.accept(s, t)
                if emit:
                    self._emit(s, ("token", t, row_logprobs(out, row[id(s)], s.sampling.logprobs)))
                if reason is not None:
                    self._finish(s, reason)
            ran = True
        return ran

    def _finish(self, s: Sequence, reason: str, message: str = "") -> None:
        if s.finished:
            return
        s.finished = True
        if self.scheduler.remove(s):
            with self._lock:
                self._n_queued -= 1
        self._by_id.pop(s.id, None)
        now = time.perf_counter()
        times = RequestTimes(e2e=now - s.arrival)
        if s.admitted_at is not None:
            times.queue = s.admitted_at - s.arrival
        if s.first_token_at is not None:
            times.ttft = s.first_token_at - s.arrival
        if len(s.out) > 1:
            times.tpot = (now - s.first_token_at) / (len(s.out) - 1)
        self.metrics.request_done(reason, len(s.prompt), len(s.out), times)
        self._emit(s, ("error", message) if reason == "error" else ("done", reason))

    def _emit(self, s: Sequence, event: tuple) -> None:
        try:
            s.sink(event)
        except Exception:  # a consumer that went away (closed event loop) must not stop the engine
            log.debug("sink of request %d failed", s.id, exc_info=True)
            if not s.finished:
                self._finish(s, "cancelled")

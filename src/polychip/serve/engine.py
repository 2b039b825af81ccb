"""The serving engine: a scheduler thread over a paged KV cache with continuous batching, chunked
prefill and prefix caching.

Each iteration of the engine thread:
  1. takes new requests and cancellations from thread-safe inboxes;
  2. admits waiting requests (FIFO) while a batch slot and their KV blocks are free: a request
     reserves blocks for prompt + max_tokens at admission (so a running sequence never runs out
     and nothing is ever preempted), reusing cached blocks of a shared prompt prefix;
  3. runs one prefill chunk (at most `prefill_chunk` tokens of one prompt) so long prompts are
     interleaved with decode steps instead of stalling them;
  4. runs one decode step for every sequence past its prefill, batched (padded to a bucket);
  5. hands each new token to its request's sink and frees the blocks of finished sequences.

Shapes are bucketed (decode batch sizes; prefill chunk lengths), so the jit cache holds
len(batch_buckets) + len(chunk_buckets) programs, all compiled by `warmup()` before serving.

Sinks are called on the engine thread with events ("token", id), ("done", finish_reason) or
("error", message); the HTTP layer forwards them to its event loop.
"""
from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from polychip.config import ConfigError, ModelConfig
from polychip.kernels.registry import KernelPolicy
from polychip.model import transformer as T
from polychip.serve import paged_model as PM
from polychip.serve.kv_cache import BlockPool, OutOfBlocks, block_hashes
from polychip.serve.metrics import Metrics

log = logging.getLogger("polychip.serve")


class QueueFull(RuntimeError):
    """The bounded waiting queue is full (the HTTP layer answers 429)."""


def _pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    out.append(hi)
    return tuple(out)


@dataclass
class EngineConfig:
    #: Most sequences decoding at once (the largest decode bucket).
    max_batch: int = 16
    #: Tokens per KV block.
    page_size: int = 16
    #: KV blocks in the pool (block 0 is scratch); None: from the device's free memory (or, where
    #: the device reports none, as CPU does, enough for max_batch full-context sequences).
    kv_blocks: int | None = None
    #: Fraction of the device's free memory (after weights) given to the KV cache when kv_blocks is None.
    kv_memory_fraction: float = 0.85
    #: Most prompt tokens processed per engine iteration (the largest prefill bucket).
    prefill_chunk: int = 64
    #: Most requests waiting for admission; beyond it submit() raises QueueFull.
    max_queue: int = 256
    #: Reuse KV blocks of identical prompt prefixes.
    prefix_cache: bool = True
    #: Compute and KV dtype.
    compute_dtype: str = "float32"

    def batch_buckets(self) -> tuple[int, ...]:
        return _pow2_buckets(1, self.max_batch)

    def chunk_buckets(self) -> tuple[int, ...]:
        return _pow2_buckets(min(16, self.prefill_chunk), self.prefill_chunk)

    def validate(self) -> None:
        for name in ("max_batch", "page_size", "prefill_chunk", "max_queue"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve: {name} must be >= 1, got {getattr(self, name)}")
        if self.kv_blocks is not None and self.kv_blocks < 2:
            raise ConfigError(f"serve: kv_blocks must be >= 2 (one is scratch), got {self.kv_blocks}")
        if not 0 < self.kv_memory_fraction <= 1:
            raise ConfigError(f"serve: kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")


@dataclass
class Sampling:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    max_tokens: int = 16


@dataclass(eq=False)
class Sequence:
    id: int
    prompt: list[int]
    sampling: Sampling
    stop_ids: frozenset[int]
    sink: Callable[[tuple], None]
    arrival: float = field(default_factory=time.perf_counter)
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    computed: int = 0  # prompt tokens whose K/V are in the cache
    registered: int = 0  # prompt blocks published to the prefix cache
    out: list[int] = field(default_factory=list)
    key_data: Any = None
    budget: int = 0
    first_token_at: float | None = None
    finished: bool = False


class Engine:
    def __init__(self, cfg: ModelConfig, params: Any, ecfg: EngineConfig | None = None,
                 policy: KernelPolicy | None = None, metrics: Metrics | None = None):
        self.cfg = cfg
        self.params = params
        self.ecfg = ecfg or EngineConfig()
        self.ecfg.validate()
        self.metrics = metrics or Metrics()
        self.rt = T.Runtime(policy or KernelPolicy.create(), None, self.ecfg.compute_dtype)
        self.max_len = cfg.max_seq_len
        ps = self.ecfg.page_size
        self.max_pages = math.ceil(self.max_len / ps)
        dtype = T.DTYPES[self.ecfg.compute_dtype]
        n_blocks = self.ecfg.kv_blocks or self._blocks_from_memory(dtype)
        if n_blocks - 1 < self.max_pages:
            log.warning("KV pool of %d blocks cannot hold one full-context sequence (%d blocks)", n_blocks - 1,
                        self.max_pages)
        self.pool = BlockPool(n_blocks, ps, self.ecfg.prefix_cache)
        self.kv = self._new_pages()
        self.kv_bytes = n_blocks * PM.bytes_per_block(cfg, ps, dtype)
        self.uses_kernel = PM.kernel_available()
        self._step = PM.make_step(cfg, self.rt, self.uses_kernel)
        self.compiled: list[dict] = []

        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: deque[Sequence] = deque()
        self._cancels: set[int] = set()
        self._waiting: deque[Sequence] = deque()
        self._n_queued = 0  # inbox + waiting (under _lock)
        self._prefilling: deque[Sequence] = deque()
        self._decoding: list[Sequence] = []
        self._by_id: dict[int, Sequence] = {}
        self._thread: threading.Thread | None = None
        self._stop = False
        self.steps = {"prefill": 0, "decode": 0}
        m = self.metrics
        m.add_gauge("queue_depth", "Requests waiting for admission.", lambda: self._n_queued)
        m.add_gauge("running_requests", "Requests admitted (prefilling or decoding).",
                    lambda: len(self._prefilling) + len(self._decoding))
        m.add_gauge("kv_cache_usage_ratio", "Fraction of KV blocks held by sequences.",
                    lambda: self.pool.in_use() / self.pool.usable)
        m.add_gauge("kv_blocks_total", "Usable KV blocks in the pool.", lambda: self.pool.usable)
        m.add_gauge("kv_blocks_free", "KV blocks not held by any sequence.", lambda: self.pool.available())
        m.add_gauge("compiled_programs", "Shape buckets compiled at start-up.", lambda: len(self.compiled))

    # ------------------------------------------------------------------------------------------
    # Sizing and start-up
    # ------------------------------------------------------------------------------------------
    def _new_pages(self) -> dict:
        # Committed to the device like the step's outputs: an uncommitted first input would give the
        # first bucket a second compilation at serving time (jit's cache key includes commitment).
        dev = jax.devices()[0]
        return jax.device_put(PM.init_pages(self.cfg, self.pool.num_blocks, self.ecfg.page_size,
                                            T.DTYPES[self.ecfg.compute_dtype]), dev)

    def _blocks_from_memory(self, dtype) -> int:
        per_block = PM.bytes_per_block(self.cfg, self.ecfg.page_size, dtype)
        stats = None
        try:
            stats = jax.devices()[0].memory_stats()
        except Exception:  # some backends raise instead of returning None
            stats = None
        if stats and stats.get("bytes_limit"):
            free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
            n = int(free * self.ecfg.kv_memory_fraction) // per_block
            if n < 2:
                raise ConfigError(f"serve: only {free / 2**20:.0f} MiB free on the device; no room for a KV cache")
            return n
        return self.ecfg.max_batch * self.max_pages + 1

    def warmup(self) -> list[dict]:
        """Compile every bucket (decode [B, 1] per batch bucket, prefill [1, C] per chunk bucket)."""
        self.compiled = []
        for B in self.ecfg.batch_buckets():
            t0 = time.perf_counter()
            self._run([], B, 1)
            self.compiled.append({"kind": "decode", "batch": B, "tokens": 1, "seconds": time.perf_counter() - t0})
        for C in self.ecfg.chunk_buckets():
            t0 = time.perf_counter()
            self._run([], 1, C)
            self.compiled.append({"kind": "prefill", "batch": 1, "tokens": C, "seconds": time.perf_counter() - t0})
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

    # ------------------------------------------------------------------------------------------
    # Thread-safe API (any thread)
    # ------------------------------------------------------------------------------------------
    def submit(self, prompt: list[int], sampling: Sampling, sink: Callable[[tuple], None],
               stop_ids: frozenset[int] = frozenset()) -> int:
        """Queue a request; returns its id. Raises ConfigError for an impossible request and
        QueueFull when the waiting queue is at its bound."""
        n = len(prompt)
        if n == 0:
            raise ConfigError("the prompt is empty")
        if n >= self.max_len:
            raise ConfigError(f"the prompt is {n} tokens; the model's context is {self.max_len}")
        if any(t < 0 or t >= self.cfg.vocab_size for t in prompt):
            raise ConfigError(f"prompt token ids must be in [0, {self.cfg.vocab_size})")
        if not (math.isfinite(sampling.temperature) and sampling.temperature >= 0):
            raise ConfigError(f"temperature must be a finite number >= 0, got {sampling.temperature}")
        if not 0 < sampling.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {sampling.top_p}")
        if sampling.max_tokens < 0:
            raise ConfigError(f"max_tokens must be >= 0, got {sampling.max_tokens}")
        # Normalise into the step's int32 inputs: top_k >= vocab (or <= 0) is "off"; seeds wrap.
        top_k = sampling.top_k if 0 < sampling.top_k < self.cfg.vocab_size else 0
        sampling = Sampling(float(sampling.temperature), int(top_k), float(sampling.top_p), sampling.seed % (2 ** 31),
                            int(sampling.max_tokens))
        seq = Sequence(next(self._ids), list(prompt), sampling, stop_ids, sink)
        seq.budget = min(sampling.max_tokens, self.max_len - n)
        need = math.ceil((n + seq.budget) / self.ecfg.page_size)
        if need > self.pool.usable:
            raise ConfigError(f"the request needs {need} KV blocks; the pool has {self.pool.usable}")
        seq.key_data = np.asarray(PM.seed_key_data(sampling.seed))
        with self._lock:
            if self._n_queued >= self.ecfg.max_queue:
                raise QueueFull(f"the server's queue is full ({self.ecfg.max_queue} requests waiting); retry later")
            self._n_queued += 1
            self._inbox.append(seq)
            self._wake.notify()
        return seq.id

    def cancel(self, seq_id: int) -> None:
        with self._lock:
            self._cancels.add(seq_id)
            self._wake.notify()

    def stats(self) -> dict:
        return {"queued": self._n_queued, "prefilling": len(self._prefilling), "decoding": len(self._decoding),
                "kv_blocks": self.pool.usable, "kv_blocks_in_use": self.pool.in_use(),
                "kv_all_returned": self.pool.all_returned(), "prefix_cached_blocks": self.pool.cached_blocks(),
                "steps": dict(self.steps)}

    def idle(self) -> bool:
        with self._lock:
            return not (self._n_queued or self._prefilling or self._decoding or self._inbox or self._cancels)

    # ------------------------------------------------------------------------------------------
    # Engine thread
    # ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stop or self._inbox or self._cancels or self._waiting or self._prefilling
                           or self._decoding):
                    self._wake.wait()
                if self._stop:
                    break
                new, self._inbox = list(self._inbox), deque()
                cancels, self._cancels = self._cancels, set()
            for s in new:
                self._by_id[s.id] = s
                self._waiting.append(s)
            for sid in cancels:
                s = self._by_id.get(sid)
                if s is not None:
                    self._finish(s, "cancelled")
            try:
                self._admit()
                ran = self._prefill_step()
                ran = self._decode_step() or ran
            except Exception as e:  # a bug: fail every admitted request rather than hang them
                log.exception("engine step failed")
                for s in list(self._prefilling) + list(self._decoding):
                    self._finish(s, "error", f"engine error: {type(e).__name__}: {e}")
                self.kv = self._new_pages()
                continue
            if not ran and self._waiting:
                # Nothing could run (blocks held by no one?) - avoid a hot spin; admission retries.
                time.sleep(0.001)
        for s in list(self._by_id.values()):
            self._finish(s, "error", "the server is shutting down")

    def _admit(self) -> None:
        ps = self.ecfg.page_size
        while self._waiting and len(self._prefilling) + len(self._decoding) < self.ecfg.max_batch:
            s = self._waiting[0]
            n = len(s.prompt)
            if not s.hashes:
                s.hashes = block_hashes(s.prompt, ps)
            # At least one prompt token is always recomputed: its logits give the first output token.
            hits = self.pool.lookup_prefix(s.hashes[: (n - 1) // ps])
            need = math.ceil((n + s.budget) / ps) - len(hits)
            try:
                fresh = self.pool.allocate(need)
            except OutOfBlocks:
                self.pool.free(hits)
                return  # FIFO: wait for blocks to come back
            self._waiting.popleft()
            with self._lock:
                self._n_queued -= 1
            self.metrics.count_prefix_hits(len(hits))
            s.blocks = hits + fresh
            s.computed = len(hits) * ps
            s.registered = len(hits)
            if s.budget == 0:
                self._finish(s, "length")
                continue
            self._prefilling.append(s)

    def _table(self, s: Sequence) -> np.ndarray:
        row = np.zeros(self.max_pages, np.int32)
        row[: len(s.blocks)] = s.blocks
        return row

    def _run(self, rows: list[tuple[Sequence, list[int], int]], B: int, Tn: int):
        """Run the step on `rows` = [(seq, tokens, start position)] padded to [B, Tn]; returns tokens [B]."""
        tokens = np.zeros((B, Tn), np.int32)
        positions = np.zeros((B, Tn), np.int32)
        n_valid = np.zeros(B, np.int32)
        tables = np.zeros((B, self.max_pages), np.int32)
        last = np.zeros(B, np.int32)
        kd = np.zeros((B, 2), np.uint32)
        temp = np.zeros(B, np.float32)
        top_k = np.zeros(B, np.int32)
        top_p = np.ones(B, np.float32)
        for i, (s, toks, start) in enumerate(rows):
            c = len(toks)
            tokens[i, :c] = toks
            positions[i] = start + np.arange(Tn)
            n_valid[i] = c
            tables[i] = self._table(s)
            last[i] = c - 1
            kd[i] = s.key_data
            temp[i], top_k[i], top_p[i] = s.sampling.temperature, s.sampling.top_k, s.sampling.top_p
        tok, kd_new, self.kv = self._step(self.params, self.kv, tokens, positions, n_valid, tables, last, kd, temp,
                                          top_k, top_p)
        return np.asarray(tok), np.asarray(kd_new)

    def _prefill_step(self) -> bool:
        if not self._prefilling:
            return False
        s = self._prefilling[0]
        n = len(s.prompt)
        c = min(self.ecfg.prefill_chunk, n - s.computed)
        bucket = next(b for b in self.ecfg.chunk_buckets() if b >= c)
        tok, kd = self._run([(s, s.prompt[s.computed:s.computed + c], s.computed)], 1, bucket)
        self.steps["prefill"] += 1
        s.computed += c
        full = s.computed // self.ecfg.page_size
        for i in range(s.registered, min(full, len(s.hashes))):
            self.pool.register(s.blocks[i], s.hashes[i])
        s.registered = max(s.registered, min(full, len(s.hashes)))
        if s.computed == n:
            self._prefilling.popleft()
            s.key_data = kd[0]
            self._decoding.append(s)
            self._accept(s, int(tok[0]))
        return True

    def _decode_step(self) -> bool:
        # Sequences that just got their first token from prefill are in _decoding with 1 output token.
        rows = [(s, [s.out[-1]], len(s.prompt) + len(s.out) - 1) for s in self._decoding]
        if not rows:
            return False
        B = next(b for b in self.ecfg.batch_buckets() if b >= len(rows))
        tok, kd = self._run(rows, B, 1)
        self.steps["decode"] += 1
        for i, (s, _, _) in enumerate(rows):
            s.key_data = kd[i]
            self._accept(s, int(tok[i]))
        return True

    def _accept(self, s: Sequence, t: int) -> None:
        """Same order as Generator.generate_ids: eos ends without emitting; then the budget."""
        now = time.perf_counter()
        if s.first_token_at is None:
            s.first_token_at = now
        if t in s.stop_ids:
            self._finish(s, "stop")
            return
        s.out.append(t)
        self._emit(s, ("token", t))
        if len(s.out) >= s.budget:
            self._finish(s, "length")

    def _finish(self, s: Sequence, reason: str, message: str = "") -> None:
        if s.finished:
            return
        s.finished = True
        if s in self._decoding:
            self._decoding.remove(s)
        if s in self._prefilling:
            self._prefilling.remove(s)
        if s in self._waiting:
            self._waiting.remove(s)
            with self._lock:
                self._n_queued -= 1
        self.pool.free(s.blocks)
        s.blocks = []
        self._by_id.pop(s.id, None)
        ttft = None if s.first_token_at is None else s.first_token_at - s.arrival
        tpot = None
        if len(s.out) > 1:
            tpot = (time.perf_counter() - s.first_token_at) / (len(s.out) - 1)
        self.metrics.request_done(reason, len(s.prompt), len(s.out), ttft, tpot)
        self._emit(s, ("error", message) if reason == "error" else ("done", reason))

    def _emit(self, s: Sequence, event: tuple) -> None:
        try:
            s.sink(event)
        except Exception:  # a consumer that went away (closed event loop) must not stop the engine
            log.debug("sink of request %d failed", s.id, exc_info=True)
            if not s.finished:
                self._finish(s, "cancelled")

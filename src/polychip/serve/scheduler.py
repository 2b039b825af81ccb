"""The scheduler: which requests run this step and how many tokens each gets (vLLM v1's split:
scheduler -> block manager (kv_cache.BlockPool) -> runner).

Policy:
  * admission is FIFO while a batch slot and the KV blocks for prompt + max_tokens are free. Blocks
    are reserved for the whole request at admission, so a running sequence never runs out and
    nothing is ever preempted (preemption policy: none; the head of the queue waits for blocks);
  * prefix reuse: the prompt's full blocks whose chained hash is cached are taken by reference
    (at least one prompt token is always recomputed: its logits give the first output token);
  * chunked, batched prefill: the next chunk (at most `prefill_chunk` tokens) of each of the first
    `prefill_rows` prompts per iteration, so a long prompt is interleaved with decode steps instead
    of stalling them, and requests that arrive together start together;
  * decode: every sequence past its prefill, one token each, batched.

Batches are padded to the shape buckets of EngineConfig, so the runner only ever sees shapes it
compiled at start-up. Not thread-safe: only the engine thread calls it.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from polychip.infer import SamplingParams
from polychip.serve.config import EngineConfig
from polychip.serve.kv_cache import BlockPool, OutOfBlocks, block_hashes
from polychip.serve.paged_model import pages_for


@dataclass(eq=False)
class Sequence:
    id: int
    prompt: list[int]
    sampling: SamplingParams
    #: (temperature, top_k, top_p) as the step takes them (SamplingParams.step_values).
    step_sampling: tuple[float, int, float]
    budget: int  # tokens it may generate (max_tokens capped by the context)
    stop_ids: frozenset[int]
    sink: Callable[[tuple], None]
    key_data: Any = None  # uint32 [2]: the request's PRNG key, advanced by every sampled token
    arrival: float = field(default_factory=time.perf_counter)
    blocks: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    computed: int = 0  # prompt tokens whose K/V are in the cache
    registered: int = 0  # prompt blocks published to the prefix cache
    out: list[int] = field(default_factory=list)
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished: bool = False


@dataclass
class Row:
    """One row of a step, all the runner needs: tokens to feed from absolute position `start`, the
    sequence's block table, its PRNG key and sampling settings."""

    tokens: list[int]
    start: int
    blocks: list[int]
    key_data: Any
    sampling: tuple[float, int, float]


@dataclass
class Batch:
    kind: str  # "prefill" | "decode"
    seqs: list[Sequence]
    rows: list[Row]
    size: int  # B: the batch bucket (rows beyond len(rows) are padding)
    width: int  # T: tokens per row (1 for decode; the chunk bucket for prefill)


class Scheduler:
    def __init__(self, ecfg: EngineConfig, pool: BlockPool,
                 on_prefix_lookup: Callable[[int, int], None] = lambda queried, hit: None):
        self.ecfg = ecfg
        self.pool = pool
        #: Called at each admission with (prompt tokens looked up, tokens found in the prefix cache).
        self.on_prefix_lookup = on_prefix_lookup
        self.waiting: deque[Sequence] = deque()
        self.prefilling: deque[Sequence] = deque()
        self.decoding: list[Sequence] = []

    def running(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    def add(self, s: Sequence) -> None:
        self.waiting.append(s)

    def remove(self, s: Sequence) -> bool:
        """Drop `s` wherever it is and give back its blocks; True when it was still waiting."""
        was_waiting = s in self.waiting
        for q in (self.waiting, self.prefilling, self.decoding):
            if s in q:
                q.remove(s)
        self.pool.free(s.blocks)
        s.blocks = []
        return was_waiting

    def admit(self) -> list[Sequence]:
        """Move waiting sequences to prefill while slots and blocks allow; returns those admitted
        (a sequence with a zero budget is admitted but not queued for prefill: it is already done)."""
        ps = self.ecfg.page_size
        admitted = []
        while self.waiting and self.running() < self.ecfg.max_batch:
            s = self.waiting[0]
            n = len(s.prompt)
            if not s.hashes:
                s.hashes = block_hashes(s.prompt, ps)
            hits = self.pool.lookup_prefix(s.hashes[: (n - 1) // ps])
            try:
                fresh = self.pool.allocate(pages_for(n + s.budget, ps) - len(hits))
            except OutOfBlocks:
                self.pool.free(hits)
                break  # FIFO: wait for blocks to come back
            self.waiting.popleft()
            s.admitted_at = time.perf_counter()
            self.on_prefix_lookup(n, len(hits) * ps)
            s.blocks = hits + fresh
            s.registered = len(hits)
            s.computed = len(hits) * ps
            admitted.append(s)
            if s.budget > 0:
                self.prefilling.append(s)
        return admitted

    def schedule(self, kind: str) -> Batch | None:
        """The next batch of `kind`: the next chunk of each of the first `prefill_rows` prompts, or one
        token for every decoding sequence."""
        if kind == "prefill":
            seqs = list(self.prefilling)[: self.ecfg.prefill_rows]
            if not seqs:
                return None
            rows = []
            for s in seqs:
                c = min(self.ecfg.prefill_chunk, len(s.prompt) - s.computed)
                rows.append(Row(s.prompt[s.computed:s.computed + c], s.computed, s.blocks, s.key_data, s.step_sampling))
            width = next(b for b in self.ecfg.chunk_buckets() if b >= max(len(r.tokens) for r in rows))
            size = next(b for b in self.ecfg.prefill_row_buckets() if b >= len(rows))
            return Batch("prefill", seqs, rows, size, width)
        if not self.decoding:
            return None
        # A sequence that just got its first token from prefill is here with 1 output token.
        seqs = list(self.decoding)
        rows = [Row([s.out[-1]], len(s.prompt) + len(s.out) - 1, s.blocks, s.key_data, s.step_sampling) for s in seqs]
        size = next(b for b in self.ecfg.batch_buckets() if b >= len(rows))
        return Batch("decode", seqs, rows, size, 1)

    def update(self, batch: Batch, tokens: np.ndarray, key_data: np.ndarray) -> list[tuple[Sequence, int]]:
        """Record what the runner did; returns (sequence, sampled token) for each sequence that produced one."""
        if batch.kind == "decode":
            for i, s in enumerate(batch.seqs):
                s.key_data = key_data[i]
            return [(s, int(tokens[i])) for i, s in enumerate(batch.seqs)]
        done = []
        for i, (s, row) in enumerate(zip(batch.seqs, batch.rows)):
            s.computed += len(row.tokens)
            full = min(s.computed // self.ecfg.page_size, len(s.hashes))
            for j in range(s.registered, full):
                self.pool.register(s.blocks[j], s.hashes[j])
            s.registered = max(s.registered, full)
            if s.computed < len(s.prompt):
                continue  # a middle chunk: its sample is discarded, its key not advanced
            self.prefilling.remove(s)
            s.key_data = key_data[i]
            self.decoding.append(s)
            done.append((s, int(tokens[i])))
        return done

    @staticmethod
    def accept(s: Sequence, token: int) -> tuple[bool, str | None]:
        """Stop conditions, in Generator.generate_ids' order: a stop id ends without being emitted;
        then the budget. Returns (emit the token, finish reason or None)."""
        if s.first_token_at is None:
            s.first_token_at = time.perf_counter()
        if token in s.stop_ids:
            return False, "stop"
        s.out.append(token)
        return True, ("length" if len(s.out) >= s.budget else None)

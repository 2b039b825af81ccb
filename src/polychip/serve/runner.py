"""The runner: executes one scheduled batch on the device (vLLM v1's model runner).

It owns the device state (weights, the paged K/V arrays) and the jitted step from
`paged_model.jit_step`, pads each `scheduler.Batch` to its shape bucket, and returns the sampled
tokens and advanced PRNG keys. It knows nothing of requests, queues or stop conditions.
"""
from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from polychip.config import ConfigError, ModelConfig
from polychip.infer import MAX_LOGPROBS, inference_layout
from polychip.model import transformer as T
from polychip.serve import paged_model as PM
from polychip.serve.config import EngineConfig
from polychip.serve.scheduler import Batch


class StepOut(NamedTuple):
    """What one step returns to the host, per row."""

    tokens: np.ndarray  # [B] int32: the sampled tokens
    key_data: np.ndarray  # [B, 2] uint32: the advanced PRNG keys
    logprob: np.ndarray  # [B] float32: log p of the sampled token
    top_ids: np.ndarray  # [B, K] int32: the K most likely tokens (K = infer.MAX_LOGPROBS)
    top_logprobs: np.ndarray  # [B, K] float32


def kv_blocks_for(cfg: ModelConfig, ecfg: EngineConfig, max_len: int) -> int:
    """Blocks in the KV pool: ecfg.kv_blocks, else what the requested concurrency needs (max_batch
    sequences of max_len tokens, plus the scratch block), capped by kv_memory_fraction of the device's
    free memory where the device reports it (CPU does not)."""
    if ecfg.kv_blocks:
        return ecfg.kv_blocks
    need = ecfg.max_batch * PM.pages_for(max_len, ecfg.page_size) + 1
    per_block = PM.bytes_per_block(cfg, ecfg.page_size, T.DTYPES[ecfg.compute_dtype])
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if stats and stats.get("bytes_limit"):
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        cap = int(free * ecfg.kv_memory_fraction) // per_block
        if cap < 2:
            raise ConfigError(f"serve: only {free / 2**20:.0f} MiB free on the device; no room for a KV cache")
        return min(need, cap)
    return need


class ModelRunner:
    def __init__(self, cfg: ModelConfig, params: Any, rt: T.Runtime, num_blocks: int, page_size: int,
                 max_len: int | None = None):
        self.cfg, self.params, self.rt = cfg, inference_layout(params), rt
        self.num_blocks, self.page_size = num_blocks, page_size
        self.max_len = max_len or cfg.max_seq_len
        self.dtype = T.DTYPES[rt.compute_dtype]
        # Page tables (and so the decode kernel's gather) span max_len, not the model's whole context.
        self.max_pages = PM.pages_for(self.max_len, page_size)
        self.kv_bytes = num_blocks * PM.bytes_per_block(cfg, page_size, self.dtype)
        self.step = PM.jit_step(cfg, rt)
        self.kv = self.new_pages()
        self._score = jax.jit(functools.partial(_score, cfg=cfg, rt=rt, top=min(MAX_LOGPROBS, cfg.vocab_size)))

    def new_pages(self) -> dict:
        """Fresh K/V pages (also after a failed step: a donated cache is gone)."""
        # Committed to the device like the step's outputs: an uncommitted first input would give the
        # first bucket a second compilation at serving time (jit's cache key includes commitment).
        return jax.device_put(PM.init_pages(self.cfg, self.num_blocks, self.page_size, self.dtype), jax.devices()[0])

    def execute(self, batch: Batch) -> StepOut:
        """Run `batch` padded to [batch.size, batch.width]."""
        B, Tn = batch.size, batch.width
        a = PM.StepArgs(self.params, self.kv, np.zeros((B, Tn), np.int32), np.zeros((B, Tn), np.int32),
                        np.zeros(B, np.int32), np.zeros((B, self.max_pages), np.int32), np.zeros(B, np.int32),
                        np.zeros((B, 2), np.uint32), np.zeros(B, np.float32), np.zeros(B, np.int32),
                        np.ones(B, np.float32))
        for i, r in enumerate(batch.rows):
            c = len(r.tokens)
            a.tokens[i, :c] = r.tokens
            a.positions[i] = r.start + np.arange(Tn)
            a.n_valid[i] = c
            a.block_tables[i, : len(r.blocks)] = r.blocks
            a.last_idx[i] = c - 1
            a.key_data[i] = r.key_data
            a.temperature[i], a.top_k[i], a.top_p[i] = r.sampling
        tok, kd, self.kv, (lp, top_ids, top_lp) = self.step(*a)
        return StepOut(*(np.asarray(x) for x in (tok, kd, lp, top_ids, top_lp)))

    def score(self, prompt: list[int]) -> StepOut:
        """Prompt log-likelihoods: for i >= 1, log p(prompt[i] | prompt[:i]) and the K most likely
        tokens there, from one full forward pass (no KV cache) padded to a power of two. Rows are the
        prompt's positions 1..n-1; tokens holds prompt[1:], key_data is empty. Safe to call from any
        thread (it reads the weights only)."""
        n = len(prompt)
        width = min(max(16, 1 << (n - 1).bit_length()), self.max_len)
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :n] = prompt
        lp, top_ids, top_lp = (np.asarray(x)[: n - 1] for x in self._score(self.params, jnp.asarray(tokens)))
        return StepOut(np.asarray(prompt[1:], np.int32), np.zeros((0, 2), np.uint32), lp, top_ids, top_lp)

    def warmup(self, ecfg: EngineConfig) -> list[dict]:
        """Compile every bucket: decode [B, 1] per batch bucket, prefill [R, C] per row and chunk bucket."""
        compiled = []
        shapes = [("decode", b, 1) for b in ecfg.batch_buckets()] + [
            ("prefill", r, c) for r in ecfg.prefill_row_buckets() for c in ecfg.chunk_buckets()]
        for kind, B, Tn in shapes:
            t0 = time.perf_counter()
            self.execute(Batch(kind, [], [], B, Tn))
            compiled.append({"kind": kind, "batch": B, "tokens": Tn, "seconds": time.perf_counter() - t0})
        return compiled


def _score(params, tokens, *, cfg: ModelConfig, rt: T.Runtime, top: int):
    """tokens [1, T] -> log p of tokens[0, 1:] given their prefixes [T-1], top ids and log p [T-1, top]."""
    lg = T.logits(params, tokens, cfg, rt)[0][0]  # [T, V] float32
    return PM.token_logprobs(lg[:-1], tokens[0, 1:], top)

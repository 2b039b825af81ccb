"""The runner: executes one scheduled batch on the device (vLLM v1's model runner).

It owns the device state (weights, the paged K/V arrays) and the jitted step from
`paged_model.jit_step`, pads each `scheduler.Batch` to its shape bucket, and returns the sampled
tokens and advanced PRNG keys. It knows nothing of requests, queues or stop conditions.
"""
from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from polychip.config import ConfigError, ModelConfig
from polychip.model import transformer as T
from polychip.serve import paged_model as PM
from polychip.serve.config import EngineConfig
from polychip.serve.scheduler import Batch



def kv_blocks_for(cfg: ModelConfig, ecfg: EngineConfig) -> int:
    """Blocks in the KV pool: ecfg.kv_blocks, else a share of the device's free memory, else (a device
    that reports no memory, as CPU) enough for max_batch full-context sequences."""
    if ecfg.kv_blocks:
        return ecfg.kv_blocks
    per_block = PM.bytes_per_block(cfg, ecfg.page_size, T.DTYPES[ecfg.compute_dtype])
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # some backends raise instead of returning None
        stats = None
    if stats and stats.get("bytes_limit"):
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        n = int(free * ecfg.kv_memory_fraction) // per_block
        if n < 2:
            raise ConfigError(f"serve: only {free / 2**20:.0f} MiB free on the device; no room for a KV cache")
        return n
    return ecfg.max_batch * PM.pages_for(cfg.max_seq_len, ecfg.page_size) + 1


class ModelRunner:
    def __init__(self, cfg: ModelConfig, params: Any, rt: T.Runtime, num_blocks: int, page_size: int):
        self.cfg, self.params, self.rt = cfg, params, rt
        self.num_blocks, self.page_size = num_blocks, page_size
        self.dtype = T.DTYPES[rt.compute_dtype]
        self.max_pages = PM.pages_for(cfg.max_seq_len, page_size)
        self.kv_bytes = num_blocks * PM.bytes_per_block(cfg, page_size, self.dtype)
        self.step = PM.jit_step(cfg, rt)
        self.kv = self.new_pages()

    def new_pages(self) -> dict:
        """Fresh K/V pages (also after a failed step: a donated cache is gone)."""
        # Committed to the device like the step's outputs: an uncommitted first input would give the
        # first bucket a second compilation at serving time (jit's cache key includes commitment).
        return jax.device_put(PM.init_pages(self.cfg, self.num_blocks, self.page_size, self.dtype), jax.devices()[0])

    def execute(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        """Run `batch` padded to [batch.size, batch.width]; -> (tokens [B] int32, key data [B, 2] uint32)."""
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
        tok, kd, self.kv = self.step(*a)
        return np.asarray(tok), np.asarray(kd)

    def warmup(self, ecfg: EngineConfig) -> list[dict]:
        """Compile every bucket: decode [B, 1] per batch bucket, prefill [1, C] per chunk bucket."""
        compiled = []
        shapes = [("decode", b, 1) for b in ecfg.batch_buckets()] + [("prefill", 1, c) for c in ecfg.chunk_buckets()]
        for kind, B, Tn in shapes:
            t0 = time.perf_counter()
            self.execute(Batch(kind, [], [], B, Tn))
            compiled.append({"kind": kind, "batch": B, "tokens": Tn, "seconds": time.perf_counter() - t0})
        return compiled

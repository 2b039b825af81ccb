"""The model step over a paged KV cache: one jitted function for decode ([B, 1]) and prefill chunks
([B, T]), compiled once per shape bucket.

Cache layout (matches polychip.kernels.paged_attention): {"k", "v"}: [L, K, P, page_size, Dh]
(layers, kv heads, pages, slot in page, head dim). A sequence's token at absolute position p lives
in page block_table[p // page_size], slot p % page_size. Page 0 is scratch (see kv_cache.py).

Decode attention goes to `paged_attention` from the kernel package when it is importable, otherwise
to `paged_attention_gather` below (plain jnp: gather the sequence's pages into a contiguous
[B, S, K, Dh] view and call the registry's `attention`). Prefill chunks always use the gather path:
their cost is amortised over T query tokens.

The block is transformer.block itself; only its `attend` (the cache write and the attention read)
is the paged one here, because positions and lengths are per row.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from polychip.config import ModelConfig
from polychip.generate import sample
from polychip.kernels.attention import attention
from polychip.kernels.registry import KernelPolicy
from polychip.kernels.rms_norm import rms_norm
from polychip.model import transformer as T
from polychip.model.rope import inv_frequencies

try:  # the Pallas/NKI paged kernel package, when present
    from polychip.kernels.paged_attention import paged_attention as _kernel_paged_attention
except ImportError:  # pragma: no cover - depends on which packages are installed
    _kernel_paged_attention = None


def kernel_available() -> bool:
    return _kernel_paged_attention is not None


def _gather(pages, block_tables):
    """pages [K, P, ps, D], block_tables [B, M] -> [B, M*ps, K, D] (the sequences' keys in order)."""
    K, _, ps, D = pages.shape
    B, M = block_tables.shape
    g = pages[:, block_tables]  # [K, B, M, ps, D]
    return g.reshape(K, B, M * ps, D).transpose(1, 2, 0, 3)


def paged_attention_gather(q, k_pages, v_pages, block_tables, lengths, *, policy: KernelPolicy, soft_cap=None):
    """Reference paged decode attention: q [B, H, D] (the query at position lengths-1), pages
    [K, P, ps, D], block_tables [B, M] int32, lengths [B] int32 -> [B, H, D]."""
    k = _gather(k_pages, block_tables).astype(q.dtype)
    v = _gather(v_pages, block_tables).astype(q.dtype)
    o = attention(q[:, None], k, v, policy=policy, causal=True, soft_cap=soft_cap, q_offset=lengths - 1,
                  kv_lengths=lengths)
    return o[:, 0]


def init_pages(cfg: ModelConfig, num_blocks: int, page_size: int, dtype=jnp.float32) -> dict:
    shape = (cfg.n_layers, cfg.n_kv_heads, num_blocks, page_size, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def bytes_per_block(cfg: ModelConfig, page_size: int, dtype=jnp.float32) -> int:
    """K and V bytes of one block over all layers."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * page_size * cfg.head_dim * jnp.dtype(dtype).itemsize


def forward(params: dict, kv: dict, tokens, positions, n_valid, block_tables, last_idx, cfg: ModelConfig,
            rt: T.Runtime, use_kernel: bool):
    """One step over a batch of sequence slices.

    tokens, positions [B, T] int32 (absolute positions; row b's slice starts at positions[b, 0]);
    n_valid [B]: how many of row b's T tokens are real (0 for padded rows); block_tables [B, M];
    last_idx [B]: which token's logits to return. Writes the new keys/values into the pages and
    returns (logits [B, V] float32, new kv)."""
    dt = T.DTYPES[rt.compute_dtype]
    B, Tn = tokens.shape
    ps = kv["k"].shape[3]
    M = block_tables.shape[1]
    inv_freq = inv_frequencies(cfg)
    kv_len = positions[:, 0] + n_valid  # keys valid after this step
    valid = jnp.arange(Tn)[None, :] < n_valid[:, None]
    page_col = jnp.clip(positions // ps, 0, M - 1)
    pages = jnp.where(valid, jnp.take_along_axis(block_tables, page_col, axis=1), 0).reshape(-1)
    slots = jnp.where(valid, positions % ps, 0).reshape(-1)

    x = jnp.take(params["embed"], tokens, axis=0).astype(dt)

    def attend(q, k, v, state):
        """The paged cache behind transformer.block: write this step's keys/values, then attend."""
        kp, vp, layer = state
        K, D = k.shape[2], k.shape[3]
        # Scatter: advanced indices (layer, pages, slots) around a slice -> update is [B*T, K, D].
        kp = kp.at[layer, :, pages, slots].set(k.reshape(B * Tn, K, D).astype(kp.dtype))
        vp = vp.at[layer, :, pages, slots].set(v.reshape(B * Tn, K, D).astype(vp.dtype))
        if Tn == 1 and use_kernel:
            o = _kernel_paged_attention(q[:, 0], kp[layer], vp[layer], block_tables, kv_len,
                                        policy=rt.policy)[:, None]
        elif Tn == 1:
            o = paged_attention_gather(q[:, 0], kp[layer], vp[layer], block_tables, kv_len, policy=rt.policy)[:, None]
        else:
            kg = _gather(kp[layer], block_tables).astype(dt)
            vg = _gather(vp[layer], block_tables).astype(dt)
            o = attention(q, kg, vg, policy=rt.policy, causal=True, q_offset=positions[:, 0], kv_lengths=kv_len)
        return o, (kp, vp, layer)

    def body(carry, xs):
        x, kp, vp = carry
        lp, layer = xs
        x, (kp, vp, _) = T.block(x, lp, positions, cfg, rt, inv_freq, attend, (kp, vp, layer))
        return (x, kp, vp), None

    layers = jnp.arange(cfg.n_layers, dtype=jnp.int32)
    (x, kp, vp), _ = jax.lax.scan(body, (x, kv["k"], kv["v"]), (params["layers"], layers))
    x = jnp.take_along_axis(x, last_idx[:, None, None], axis=1)  # [B, 1, D]
    x = rms_norm(x, params["final_norm"], eps=cfg.norm_eps, policy=rt.policy)
    w = T.output_weight(params, cfg).astype(x.dtype)
    lg = jnp.einsum("btd,dv->btv", x, w, preferred_element_type=jnp.float32)[:, 0]
    return lg, {"k": kp, "v": vp}


def _sample_rows(logits, key_data, temperature, top_k, top_p):
    """Per-row keys (each request has its own seed): key_data [B, 2] uint32 -> (tokens [B], next key_data).

    Each row does what Generator does for one sequence: key, sub = split(key); sample(..., sub)."""

    def one(lg, kd, t, k, p):
        key, sub = jax.random.split(jax.random.wrap_key_data(kd))
        tok = sample(lg[None], sub, t[None], k[None], p[None])[0]
        return tok, jax.random.key_data(key)

    return jax.vmap(one)(logits, key_data, temperature, top_k, top_p)


def make_step(cfg: ModelConfig, rt: T.Runtime, use_kernel: bool):
    """jit(step)(params, kv, tokens, positions, n_valid, block_tables, last_idx, key_data, temperature,
    top_k, top_p) -> (next tokens [B] int32, next key_data [B, 2], kv). kv is donated."""

    @functools.partial(jax.jit, donate_argnums=(1,))
    def step(params, kv, tokens, positions, n_valid, block_tables, last_idx, key_data, temperature, top_k, top_p):
        lg, kv = forward(params, kv, tokens, positions, n_valid, block_tables, last_idx, cfg, rt, use_kernel)
        tok, kd = _sample_rows(lg, key_data, temperature, top_k, top_p)
        return tok, kd, kv

    return step


def seed_key_data(seed: int) -> Any:
    """uint32 [2] raw key for `seed` (what jax.random.key(seed) holds)."""
    return jax.random.key_data(jax.random.key(seed))

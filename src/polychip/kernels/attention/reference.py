"""Plain-jnp causal attention with GQA/MQA, sliding window, soft-cap and a query offset.

Shapes: q [B, T, H, D]; k, v [B, S, K, D] with H % K == 0 (each KV head serves G = H // K query
heads; we reshape q to [B, T, K, G, D] instead of repeating K/V in memory). Query t sits at absolute
position q_offset + t; key s at position s. Output [B, T, H, D] in q's dtype. Scores and softmax
are computed in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from polychip.kernels.common import NEG_INF


def attention_mask(T: int, S: int, q_offset, causal: bool, sliding_window: int | None, kv_lengths=None):
    """Boolean [B or 1, T, S] mask of allowed (query, key) pairs."""
    q_off = jnp.asarray(0 if q_offset is None else q_offset, jnp.int32).reshape(-1, 1, 1)  # [B|1,1,1]
    q_pos = q_off + jnp.arange(T, dtype=jnp.int32)[None, :, None]
    k_pos = jnp.arange(S, dtype=jnp.int32)[None, None, :]
    mask = jnp.ones((1, T, S), bool)
    if causal:
        mask = mask & (k_pos <= q_pos)
    if sliding_window is not None:
        mask = mask & (k_pos > q_pos - sliding_window)
    if kv_lengths is not None:
        mask = mask & (k_pos < jnp.asarray(kv_lengths, jnp.int32).reshape(-1, 1, 1))
    return mask


def attention(q, k, v, *, causal=True, sliding_window=None, soft_cap=None, q_offset=None, kv_lengths=None,
              scale=None, precision=jax.lax.Precision.HIGHEST):
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    scale = D ** -0.5 if scale is None else scale
    qg = q.reshape(B, T, K, G, D)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, precision=precision, preferred_element_type=jnp.float32) * scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    mask = attention_mask(T, S, q_offset, causal, sliding_window, kv_lengths)  # [B|1, T, S]
    s = jnp.where(mask[:, None, None, :, :], s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(mask[:, None, None, :, :], p, 0.0)  # rows with no allowed key -> 0, not uniform
    o = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype) if v.dtype != jnp.float32 else p, v,
                   precision=precision, preferred_element_type=jnp.float32)
    return o.reshape(B, T, H, D).astype(q.dtype)

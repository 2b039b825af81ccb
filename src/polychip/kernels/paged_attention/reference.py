"""Paged decode attention in plain jnp: gather each sequence's pages, masked softmax in float32.

See api.py for the cache layout. q [B, H, D]; k_pages, v_pages [K, P, page_size, D];
block_tables [B, max_pages] int32; lengths [B] int32 -> [B, H, D] in q's dtype.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from polychip.kernels.common import NEG_INF


class Dims(NamedTuple):
    """A call's sizes: batch B, query heads H, kv heads K, group G = H // K, head_dim D, page_size ps,
    pages P in the pool, max pages per sequence M; and the softmax scale (default D ** -0.5)."""

    B: int
    H: int
    K: int
    G: int
    D: int
    ps: int
    P: int
    M: int
    scale: float

    @staticmethod
    def of(q, k_pages, block_tables, scale=None) -> "Dims":
        B, H, D = q.shape
        K, P, ps, _ = k_pages.shape
        return Dims(B, H, K, H // K, D, ps, P, block_tables.shape[1], D ** -0.5 if scale is None else float(scale))


def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, soft_cap=None, scale=None,
                    precision=jax.lax.Precision.HIGHEST):
    B, H, K, G, D, ps, _, M, scale = Dims.of(q, k_pages, block_tables, scale)
    # [K, B, M, ps, D] -> [K, B, S, D] with S = M * ps: sequence b's token t is row t of its slab.
    k = k_pages[:, block_tables].reshape(K, B, M * ps, D).astype(jnp.float32)
    v = v_pages[:, block_tables].reshape(K, B, M * ps, D).astype(jnp.float32)
    qg = q.reshape(B, K, G, D).astype(jnp.float32)
    s = jnp.einsum("bkgd,kbsd->bkgs", qg, k, precision=precision) * scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    valid = (jnp.arange(M * ps)[None, :] < lengths[:, None])[:, None, None, :]  # [B, 1, 1, S]
    p = jax.nn.softmax(jnp.where(valid, s, NEG_INF), axis=-1)
    p = jnp.where(valid, p, 0.0)  # length 0 -> zeros, not a uniform average of garbage
    o = jnp.einsum("bkgs,kbsd->bkgd", p, v, precision=precision)
    return o.reshape(B, H, D).astype(q.dtype)

"""Paged decode attention in plain jnp: gather each sequence's pages, masked softmax in float32.

See api.py for the cache layout. q [B, H, D]; k_pages, v_pages [K, P, page_size, D];
block_tables [B, max_pages] int32; lengths [B] int32 -> [B, H, D] in q's dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -1e30


def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, soft_cap=None, scale=None,
                    precision=jax.lax.Precision.HIGHEST):
    B, H, D = q.shape
    K, _, ps, _ = k_pages.shape
    M = block_tables.shape[1]
    G = H // K
    scale = D ** -0.5 if scale is None else scale
    # [K, B, M, ps, D] -> [K, B, S, D] with S = M * ps: sequence b's token t is row t of its slab.
    k = k_pages[:, block_tables].reshape(K, B, M * ps, D).astype(jnp.float32)
    v = v_pages[:, block_tables].reshape(K, B, M * ps, D).astype(jnp.float32)
    qg = q.reshape(B, K, G, D).astype(jnp.float32)
    s = jnp.einsum("bkgd,kbsd->bkgs", qg, k, precision=precision) * scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    valid = (jnp.arange(M * ps)[None, :] < lengths[:, None])[:, None, None, :]  # [B, 1, 1, S]
    p = jax.nn.softmax(jnp.where(valid, s, NEG), axis=-1)
    p = jnp.where(valid, p, 0.0)  # length 0 -> zeros, not a uniform average of garbage
    o = jnp.einsum("bkgs,kbsd->bkgd", p, v, precision=precision)
    return o.reshape(B, H, D).astype(q.dtype)

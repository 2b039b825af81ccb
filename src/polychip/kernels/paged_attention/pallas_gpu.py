"""Paged decode attention as a Pallas GPU (Triton) kernel.

Grid (B, K): one program per (sequence, kv head) loops over the sequence's cdiv(length, page_size)
pages, reading each physical page id from the block table and keeping an online softmax for the
G = H / K query heads of that kv head. Query heads are padded to 16 rows (Triton's smallest dot
tile); page_size and head_dim must be powers of two (Triton tensor shapes).

Verified in Pallas' interpret mode on CPU only; the compiled Triton path has not run on a GPU here.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from polychip.kernels.common import NEG_INF
from polychip.kernels.pallas_common import gpu_options, is_pow2, pallas_kernels
from polychip.kernels.paged_attention.reference import Dims

F32 = jnp.float32


def _kernel(q_ref, k_ref, v_ref, bt_ref, len_ref, o_ref, *, ps, scale, soft_cap):
    length = len_ref[0]
    q = q_ref[...]
    gp, d = q.shape

    def body(i, carry):
        m, l, acc = carry
        page = bt_ref[i]
        k = k_ref[page]  # [ps, D]
        v = v_ref[page]
        # Slots past the length may hold anything (stale or uninitialised cache); 0 * NaN is NaN.
        v = jnp.where((i * ps + jnp.arange(ps))[:, None] < length, v, jnp.zeros_like(v))
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=F32) * scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        pos = i * ps + jnp.arange(ps)[None, :]
        s = jnp.where(pos < length, s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        e = jnp.exp(s - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        l = alpha * l + jnp.sum(e, axis=1)
        acc = alpha[:, None] * acc + jnp.dot(e.astype(v.dtype), v, preferred_element_type=F32)
        return m_new, l, acc

    init = (jnp.full((gp,), NEG_INF, F32), jnp.zeros((gp,), F32), jnp.zeros((gp, d), F32))
    _, l, acc = jax.lax.fori_loop(0, pl.cdiv(length, ps), body, init)
    o_ref[...] = jnp.where(l[:, None] > 0, acc / jnp.where(l > 0, l, 1.0)[:, None], 0.0).astype(o_ref.dtype)


def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, soft_cap=None, scale=None,
                    interpret: bool = False):
    """q [B, H, D], k/v_pages [K, P, page_size, D], block_tables [B, M] int32, lengths [B] -> [B, H, D]."""
    B, H, K, G, D, ps, P, M, scale = Dims.of(q, k_pages, block_tables, scale)
    Gp = max(16, pl.next_power_of_2(G))
    qg = jnp.pad(q.reshape(B, K, G, D), ((0, 0), (0, 0), (0, Gp - G), (0, 0)))
    out = pl.pallas_call(
        functools.partial(_kernel, ps=ps, scale=scale, soft_cap=soft_cap),
        grid=(B, K),
        in_specs=[pl.BlockSpec((None, None, Gp, D), lambda b, h: (b, h, 0, 0)),
                  pl.BlockSpec((None, P, ps, D), lambda b, h: (h, 0, 0, 0)),
                  pl.BlockSpec((None, P, ps, D), lambda b, h: (h, 0, 0, 0)),
                  pl.BlockSpec((None, M), lambda b, h: (b, 0)),
                  pl.BlockSpec((1,), lambda b, h: (b,))],
        out_specs=pl.BlockSpec((None, None, Gp, D), lambda b, h: (b, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((B, K, Gp, D), q.dtype),
        name="paged_attention", **gpu_options(interpret, num_warps=4, num_stages=2),
    )(qg, k_pages, v_pages, block_tables.astype(jnp.int32), lengths.astype(jnp.int32))
    return out[:, :, :G].reshape(B, H, D)


def _shape_reason(query) -> str | None:
    if not is_pow2(query.get("page_size", 0)) or not is_pow2(query.get("head_dim", 0)):
        return "page_size and head_dim must be powers of two for Triton"
    return None


# auto=False until it has run on a GPU: only an override (paged_attention=pallas_gpu) picks it.
KERNELS = pallas_kernels("gpu", paged_attention, priority=20, shape_reason=_shape_reason, auto=False)

"""Paged decode attention as a Pallas TPU (Mosaic) kernel.

Grid (B, K, max_pages): one program per (sequence, kv head) walks that sequence's pages in order,
keeping an online softmax (Milakov & Gimelshein 2018) for the G = H / K query heads that share the
kv head in VMEM scratch; K/V are never repeated per query head. `block_tables` (flattened) and
`lengths` are scalar-prefetched into SMEM so the BlockSpec index maps can look up the physical page
of step p: the pipeline DMAs page block_tables[b, p] of head k while the previous page computes.
Steps past the sequence's last page re-request the last valid page (Pallas skips a copy whose block
index did not change) and skip compute, so a short sequence costs ~its own pages.

One page per grid step: small pages (16 tokens x 128 dims) make each step a short DMA, so larger
page sizes amortise the per-step overhead better; the serving cache chooses page_size.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from polychip.kernels.common import NEG_INF
from polychip.kernels.pallas_common import pallas_kernels, tpu_options
from polychip.kernels.paged_attention.reference import Dims

F32 = jnp.float32


def _kernel(bt_ref, len_ref, q_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc, *, ps, scale, soft_cap):
    b, p = pl.program_id(0), pl.program_id(2)
    length = len_ref[b]

    @pl.when(p == 0)
    def _():
        m_sc[...] = jnp.full_like(m_sc, NEG_INF)
        l_sc[...] = jnp.zeros_like(l_sc)
        acc[...] = jnp.zeros_like(acc)

    @pl.when(p * ps < length)
    def _():
        q = q_ref[...]
        s = jax.lax.dot_general(q, k_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=F32) * scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        pos = p * ps + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(pos < length, s, NEG_INF)
        m_old = m_sc[...]
        m_new = jnp.maximum(m_old, jnp.max(s, axis=1, keepdims=True))
        e = jnp.exp(s - m_new)
        alpha = jnp.exp(m_old - m_new)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(e, axis=1, keepdims=True)
        # Slots past the length may hold anything (stale or uninitialised cache); 0 * NaN is NaN.
        v = v_ref[...]
        vpos = p * ps + jax.lax.broadcasted_iota(jnp.int32, v.shape, 0)
        v = jnp.where(vpos < length, v, jnp.zeros_like(v))
        acc[...] = alpha * acc[...] + jnp.dot(e.astype(v.dtype), v, preferred_element_type=F32)
        m_sc[...] = m_new

    @pl.when(p == pl.num_programs(2) - 1)
    def _():
        l = l_sc[...]
        o_ref[...] = jnp.where(l > 0, acc[...] / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)


def paged_attention(q, k_pages, v_pages, block_tables, lengths, *, soft_cap=None, scale=None,
                    interpret: bool = False):
    """q [B, H, D], k/v_pages [K, P, page_size, D], block_tables [B, M] int32, lengths [B] -> [B, H, D]."""
    B, H, K, G, D, ps, _, M, scale = Dims.of(q, k_pages, block_tables, scale)
    qg = q.reshape(B, K, G, D)

    def kv_map(b, h, p, bt, ln):
        last = jnp.maximum(pl.cdiv(ln[b], ps) - 1, 0)
        return h, bt[b * M + jnp.minimum(p, last)], 0, 0

    kv_spec = pl.BlockSpec((None, None, ps, D), kv_map)
    q_spec = pl.BlockSpec((None, None, G, D), lambda b, h, p, bt, ln: (b, h, 0, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(B, K, M),
        in_specs=[q_spec, kv_spec, kv_spec], out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((G, 1), F32), pltpu.VMEM((G, 1), F32), pltpu.VMEM((G, D), F32)],
    )
    out = pl.pallas_call(
        functools.partial(_kernel, ps=ps, scale=scale, soft_cap=soft_cap),
        grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((B, K, G, D), q.dtype),
        name="paged_attention", **tpu_options(interpret, "parallel", "parallel", "arbitrary"),
        # Mosaic kernels are opaque to XLA's cost model; this analytic estimate (every sequence at
        # full max_pages length: an upper bound, lengths are runtime values) is what it reports.
        cost_estimate=pl.CostEstimate(
            flops=4 * B * H * M * ps * D, transcendentals=B * H * M * ps,
            bytes_accessed=2 * B * K * M * ps * D * k_pages.dtype.itemsize + 2 * B * H * D * q.dtype.itemsize),
    )(block_tables.reshape(-1).astype(jnp.int32), lengths.astype(jnp.int32), qg, k_pages, v_pages)
    return out.reshape(B, H, D)


KERNELS = pallas_kernels("tpu", paged_attention, priority=10)

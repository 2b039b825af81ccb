"""Fused output projection + cross-entropy as Pallas TPU (Mosaic) kernels; [N, V] logits never exist.

h [N, D], w [D, V], labels [N], mask [N] -> (loss_sum, count) float32. Three kernels:

  forward  grid (N/tb, V/vb), vocab axis sequential: per token block, an online log-sum-exp over
           vocab blocks in VMEM scratch; writes lse [N] and the label logit [N].
  dh       grid (N/tb, V/vb): recompute each logits tile, g = (softmax - onehot) * mask * dloss,
           accumulate g @ w_blk^T into a [tb, D] float32 scratch.
  dw       grid (V/vbw, N/tbw), token axis sequential: recompute the tile, accumulate h_blk^T @ g into
           a [D, vbw] float32 scratch.

Splitting dh and dw (as flash attention's backward splits dq and dkv) costs one extra logits matmul
but keeps every accumulator in VMEM with no cross-block atomics. Tokens are zero-padded to a
multiple of the token block in the wrapper (cheap: [pad, D]); the vocabulary is not padded (that
would copy w): columns >= V of the last vocab block hold unspecified data and are masked in-kernel,
including w's columns before they meet g in the dh matmul (0 * garbage could be NaN).

Intensity: the forward and dh re-read all of w once per token block (flops/byte ~ tb) and dw re-reads
all of h once per vocab block (~ vbw), hence the large default blocks; see `blocks_for`.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from polychip.kernels.common import NEG_INF
from polychip.kernels.pallas_common import pallas_kernels, tpu_options

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Blocks:
    tb: int = 512    # token rows per block (forward, dh)
    vb: int = 512    # vocab columns per block (forward, dh)
    tbw: int = 256   # token rows per block (dw)
    vbw: int = 512   # vocab columns per block (dw)
    vmem_limit: int = 48 * 2**20


def blocks_for(n_tokens: int, d_model: int, vocab: int, dtype) -> Blocks:
    """Heuristic blocks keeping each kernel's VMEM (double-buffered inputs/outputs + float32
    accumulator) near 32 MiB, under the 48 MiB limit we request (v7x has 64 MiB per core). At
    D = 4096 bf16: dh holds h 2x4 + w 2x4 + dh 2x4 + acc 8 MiB. Token blocks shrink as D grows;
    small problems use one block per dimension."""
    itemsize = jnp.dtype(dtype).itemsize
    tb = max(16, min(1024, (4 * 2**20) // (d_model * itemsize)) // 16 * 16)  # h block ~4 MiB max
    vb = max(128, min(512, (4 * 2**20) // (d_model * itemsize)) // 128 * 128)
    vbw = max(128, min(1024, (8 * 2**20) // (d_model * 4)) // 128 * 128)  # f32 dw accumulator ~8 MiB
    tbw = max(16, min(512, (4 * 2**20) // (d_model * itemsize)) // 16 * 16)
    n16 = -(-n_tokens // 16) * 16
    return Blocks(tb=min(tb, n16), vb=vocab if vocab <= vb else vb, tbw=min(tbw, n16),
                  vbw=vocab if vocab <= vbw else vbw)


def _logits(h_ref, w_ref, j, vb, V, ragged):
    w = w_ref[...]
    cols = j * vb + jax.lax.broadcasted_iota(jnp.int32, (1, w.shape[1]), 1)
    if ragged:
        w = jnp.where(cols < V, w, jnp.zeros_like(w))  # the last block reads past V: unspecified data
    logits = jnp.dot(h_ref[...], w, preferred_element_type=F32)
    if ragged:
        logits = jnp.where(cols < V, logits, NEG_INF)
    return logits, cols, w


def _fwd_kernel(h_ref, w_ref, y_ref, lse_ref, pk_ref, m_sc, l_sc, p_sc, *, vb, V, ragged):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _():
        m_sc[...] = jnp.full_like(m_sc, NEG_INF)
        l_sc[...] = jnp.zeros_like(l_sc)
        p_sc[...] = jnp.zeros_like(p_sc)

    logits, cols, _ = _logits(h_ref, w_ref, j, vb, V, ragged)
    m_old = m_sc[...]
    m_new = jnp.maximum(m_old, jnp.max(logits, axis=1, keepdims=True))
    l_sc[...] = l_sc[...] * jnp.exp(m_old - m_new) + jnp.sum(jnp.exp(logits - m_new), axis=1, keepdims=True)
    m_sc[...] = m_new
    p_sc[...] += jnp.sum(jnp.where(cols == y_ref[...], logits, 0.0), axis=1, keepdims=True)

    @pl.when(j == pl.num_programs(1) - 1)
    def _():
        lse_ref[...] = m_sc[...] + jnp.log(l_sc[...])
        pk_ref[...] = p_sc[...]


def _grad_tile(h_ref, w_ref, y_ref, lse_ref, c_ref, j, vb, V, ragged):
    logits, cols, w = _logits(h_ref, w_ref, j, vb, V, ragged)
    p = jnp.exp(logits - lse_ref[...])  # masked columns: exp(NEG_INF - lse) == 0
    g = (p - jnp.where(cols == y_ref[...], 1.0, 0.0)) * c_ref[...]
    return g.astype(w.dtype), w


def _dh_kernel(h_ref, w_ref, y_ref, lse_ref, c_ref, dh_ref, acc, *, vb, V, ragged):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _():
        acc[...] = jnp.zeros_like(acc)

    g, w = _grad_tile(h_ref, w_ref, y_ref, lse_ref, c_ref, j, vb, V, ragged)
    acc[...] += jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())), preferred_element_type=F32)

    @pl.when(j == pl.num_programs(1) - 1)
    def _():
        dh_ref[...] = acc[...].astype(dh_ref.dtype)


def _dw_kernel(h_ref, w_ref, y_ref, lse_ref, c_ref, dw_ref, acc, *, vb, V, ragged):
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _():
        acc[...] = jnp.zeros_like(acc)

    g, _ = _grad_tile(h_ref, w_ref, y_ref, lse_ref, c_ref, j, vb, V, ragged)
    acc[...] += jax.lax.dot_general(h_ref[...], g, (((0,), (0,)), ((), ())), preferred_element_type=F32)

    @pl.when(i == pl.num_programs(1) - 1)
    def _():
        dw_ref[...] = acc[...].astype(dw_ref.dtype)


def _cost(Np, D, V, it, tb, vb, kind):
    """Analytic cost of one kernel for its block schedule (Mosaic kernels are opaque to XLA's cost
    model; this is what the compiler reports for them). Bytes count every re-read the grid does."""
    Vp = -(-V // vb) * vb
    nt, nv = Np // tb, Vp // vb
    mm = 2 * Np * D * Vp
    if kind == "fwd":
        return pl.CostEstimate(flops=mm + 6 * Np * Vp, transcendentals=Np * Vp,
                               bytes_accessed=Np * D * it + nt * D * Vp * it + 12 * Np)
    if kind == "dh":
        return pl.CostEstimate(flops=2 * mm + 6 * Np * Vp, transcendentals=Np * Vp,
                               bytes_accessed=2 * Np * D * it + nt * D * Vp * it + 12 * Np)
    return pl.CostEstimate(flops=2 * mm + 6 * Np * Vp, transcendentals=Np * Vp,
                           bytes_accessed=nv * (Np * D * it + 12 * Np) + 2 * D * Vp * it)


def _options(b: Blocks, interpret):
    return tpu_options(interpret, "parallel", "arbitrary", vmem_limit_bytes=b.vmem_limit)


def _forward(h, w, y2, b: Blocks, interpret):
    Np, D = h.shape
    V = w.shape[1]
    kern = functools.partial(_fwd_kernel, vb=b.vb, V=V, ragged=V % b.vb != 0)
    row = pl.BlockSpec((b.tb, 1), lambda i, j: (i, 0))
    return pl.pallas_call(
        kern, grid=(Np // b.tb, pl.cdiv(V, b.vb)),
        in_specs=[pl.BlockSpec((b.tb, D), lambda i, j: (i, 0)), pl.BlockSpec((D, b.vb), lambda i, j: (0, j)), row],
        out_specs=(row, row),
        out_shape=(jax.ShapeDtypeStruct((Np, 1), F32),) * 2,
        scratch_shapes=[pltpu.VMEM((b.tb, 1), F32)] * 3,
        **_options(b, interpret), name="ce_fwd",
        cost_estimate=_cost(Np, D, V, h.dtype.itemsize, b.tb, b.vb, "fwd"),
    )(h, w, y2)


def _backward(h, w, y2, lse, coef, b: Blocks, interpret):
    Np, D = h.shape
    V = w.shape[1]
    row = pl.BlockSpec((b.tb, 1), lambda i, j: (i, 0))
    dh = pl.pallas_call(
        functools.partial(_dh_kernel, vb=b.vb, V=V, ragged=V % b.vb != 0),
        grid=(Np // b.tb, pl.cdiv(V, b.vb)),
        in_specs=[pl.BlockSpec((b.tb, D), lambda i, j: (i, 0)), pl.BlockSpec((D, b.vb), lambda i, j: (0, j)),
                  row, row, row],
        out_specs=pl.BlockSpec((b.tb, D), lambda i, j: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((Np, D), h.dtype),
        scratch_shapes=[pltpu.VMEM((b.tb, D), F32)],
        **_options(b, interpret), name="ce_bwd_dh",
        cost_estimate=_cost(Np, D, V, h.dtype.itemsize, b.tb, b.vb, "dh"),
    )(h, w, y2, lse, coef)
    roww = pl.BlockSpec((b.tbw, 1), lambda j, i: (i, 0))
    dw = pl.pallas_call(
        functools.partial(_dw_kernel, vb=b.vbw, V=V, ragged=V % b.vbw != 0),
        grid=(pl.cdiv(V, b.vbw), Np // b.tbw),
        in_specs=[pl.BlockSpec((b.tbw, D), lambda j, i: (i, 0)), pl.BlockSpec((D, b.vbw), lambda j, i: (0, j)),
                  roww, roww, roww],
        out_specs=pl.BlockSpec((D, b.vbw), lambda j, i: (0, j)),
        out_shape=jax.ShapeDtypeStruct((D, V), w.dtype),
        scratch_shapes=[pltpu.VMEM((D, b.vbw), F32)],
        **_options(b, interpret), name="ce_bwd_dw",
        cost_estimate=_cost(Np, D, V, h.dtype.itemsize, b.tbw, b.vbw, "dw"),
    )(h, w, y2, lse, coef)
    return dh, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ce(h, w, y2, mask, b, interpret):
    lse, pk = _forward(h, w, y2, b, interpret)
    m = mask.astype(F32)
    return jnp.sum((lse[:, 0] - pk[:, 0]) * m), jnp.sum(m)


def _ce_fwd(h, w, y2, mask, b, interpret):
    lse, pk = _forward(h, w, y2, b, interpret)
    m = mask.astype(F32)
    return (jnp.sum((lse[:, 0] - pk[:, 0]) * m), jnp.sum(m)), (h, w, y2, mask, lse)


def _ce_bwd(b, interpret, res, cts):
    h, w, y2, mask, lse = res
    g, _ = cts
    dh, dw = _backward(h, w, y2, lse, (g * mask.astype(F32))[:, None], b, interpret)
    return dh, dw, None, None


_ce.defvjp(_ce_fwd, _ce_bwd)


def cross_entropy(h, w, labels, mask, *, interpret: bool = False, blocks: Blocks | None = None):
    """h [N, D], w [D, V], labels [N] int, mask [N] -> (loss_sum, count) float32 scalars."""
    N, D = h.shape
    b = blocks or blocks_for(N, D, w.shape[1], h.dtype)
    step = math.lcm(b.tb, b.tbw)
    pad = -N % step
    labels = labels.astype(jnp.int32)
    if pad:  # padded rows: h = 0, label 0, mask 0 -> they add nothing to the loss or either gradient
        h = jnp.pad(h, ((0, pad), (0, 0)))
        labels = jnp.pad(labels, (0, pad))
        mask = jnp.pad(mask, (0, pad))
    total, count = _ce(h, w.astype(h.dtype), labels[:, None], mask, b, bool(interpret))
    return total, count


# No Pallas GPU kernel: on GPU, xla_chunked runs its tile matmuls on cuBLAS.
KERNELS = pallas_kernels("tpu", cross_entropy, priority=10)

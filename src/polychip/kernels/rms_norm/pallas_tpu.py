"""RMSNorm fused with its scale as a Pallas TPU (Mosaic) kernel, forward and backward.

x [..., D] is viewed as [N, D] rows; each grid step normalises a block of `block_rows` full rows in
VMEM (the row reduction never leaves the core). The backward kernel recomputes 1/rms from x (cheaper
than storing it: one extra pass over the VMEM block, no extra HBM traffic beyond reading x) and writes
dx plus one partial d(scale) row per grid step, summed in XLA ([G, D] float32, G = N / block_rows).

Rounding matches the reference: normalise in float32, round to x's dtype, multiply by the scale
rounded to x's dtype (the product of two bf16 values is exact in float32, so rounding it once to
bf16 equals a bf16 multiply).

`interpret=True` runs the same kernel through Pallas' TPU interpreter (`pltpu.InterpretParams()`),
which executes on CPU and models TPU memory spaces; that is how CI verifies it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from polychip.kernels.pallas_common import pallas_kernels, tpu_options

F32 = jnp.float32


def block_rows_for(n_rows: int, d: int, dtype) -> int:
    """Heuristic: ~1 MiB of x per block (x, dy, dx double-buffered stays well inside scoped VMEM),
    a multiple of 16 rows (bf16 packs 16 rows per vreg tile), or all rows when there are fewer."""
    itemsize = jnp.dtype(dtype).itemsize
    rows = max(16, min(1024, (1 << 20) // max(1, d * itemsize)) // 16 * 16)
    return n_rows if n_rows <= rows else rows


def _fwd_kernel(x_ref, s_ref, o_ref, *, eps):
    x = x_ref[...].astype(F32)
    r = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    n = (x * r).astype(o_ref.dtype).astype(F32)
    o_ref[...] = (n * s_ref[...].astype(o_ref.dtype).astype(F32)).astype(o_ref.dtype)


def _bwd_kernel(x_ref, s_ref, dy_ref, dx_ref, ds_ref, *, eps, n_rows, block_rows):
    x = x_ref[...].astype(F32)
    dy = dy_ref[...].astype(F32)
    s = s_ref[...].astype(F32)
    r = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    n = x * r
    dn = dy * s
    # d/dx of x*r: r * (dn - n * mean(dn * n)) (the rsqrt's derivative folds into the mean term).
    dx_ref[...] = (r * (dn - n * jnp.mean(dn * n, axis=-1, keepdims=True))).astype(dx_ref.dtype)
    # Rows past N in the last block hold unspecified data: select them out of the scale gradient.
    row = pl.program_id(0) * block_rows + jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
    ds_ref[...] = jnp.sum(jnp.where(row < n_rows, dy * n, 0.0), axis=0, keepdims=True)


# Mosaic kernels are opaque to XLA's cost model: the CostEstimate attached to each pallas_call is
# what the compiler reports (and schedules around) for it, so it counts the HBM bytes this block
# schedule actually moves.
def _forward(x2, scale, eps, interpret, block_rows):
    N, D = x2.shape
    br = block_rows or block_rows_for(N, D, x2.dtype)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, eps=eps),
        out_shape=jax.ShapeDtypeStruct((N, D), x2.dtype),
        grid=(pl.cdiv(N, br),),
        in_specs=[pl.BlockSpec((br, D), lambda i: (i, 0)), pl.BlockSpec((1, D), lambda i: (0, 0))],
        out_specs=pl.BlockSpec((br, D), lambda i: (i, 0)),
        cost_estimate=pl.CostEstimate(flops=4 * N * D, transcendentals=N,
                                      bytes_accessed=(2 * N + 1) * D * x2.dtype.itemsize),
        name="rms_norm_fwd",
        **tpu_options(interpret, "parallel"),
    )(x2, scale.reshape(1, D))


def _backward(x2, scale, dy, eps, interpret, block_rows):
    N, D = x2.shape
    br = block_rows or block_rows_for(N, D, x2.dtype)
    G = pl.cdiv(N, br)
    dx, ds = pl.pallas_call(
        functools.partial(_bwd_kernel, eps=eps, n_rows=N, block_rows=br),
        out_shape=(jax.ShapeDtypeStruct((N, D), x2.dtype), jax.ShapeDtypeStruct((G, 1, D), F32)),
        grid=(G,),
        in_specs=[pl.BlockSpec((br, D), lambda i: (i, 0)), pl.BlockSpec((1, D), lambda i: (0, 0)),
                  pl.BlockSpec((br, D), lambda i: (i, 0))],
        out_specs=(pl.BlockSpec((br, D), lambda i: (i, 0)), pl.BlockSpec((None, 1, D), lambda i: (i, 0, 0))),
        cost_estimate=pl.CostEstimate(flops=12 * N * D, transcendentals=N,
                                      bytes_accessed=(3 * N + 1) * D * x2.dtype.itemsize + G * D * 4),
        name="rms_norm_bwd",
        **tpu_options(interpret, "parallel"),
    )(x2, scale.reshape(1, D), dy)
    return dx, jnp.sum(ds, axis=(0, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _rms(x2, scale, eps, interpret, block_rows):
    return _forward(x2, scale, eps, interpret, block_rows)


def _rms_fwd(x2, scale, eps, interpret, block_rows):
    return _forward(x2, scale, eps, interpret, block_rows), (x2, scale)


def _rms_bwd(eps, interpret, block_rows, res, dy):
    x2, scale = res
    dx, ds = _backward(x2, scale, dy, eps, interpret, block_rows)
    return dx, ds.astype(scale.dtype)


_rms.defvjp(_rms_fwd, _rms_bwd)


def rms_norm(x, scale, *, eps: float = 1e-5, interpret: bool = False, block_rows: int | None = None):
    """x [..., D], scale [D] -> [..., D] in x's dtype (see module docstring)."""
    D = x.shape[-1]
    y = _rms(x.reshape(-1, D), scale, float(eps), bool(interpret), block_rows)
    return y.reshape(x.shape)


# Blocks always span the full feature dim, so any D satisfies Mosaic's (8, 128) block rule.
KERNELS = pallas_kernels("tpu", rms_norm, priority=10)

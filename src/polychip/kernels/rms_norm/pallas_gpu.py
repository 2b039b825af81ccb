"""RMSNorm fused with its scale as a Pallas GPU (Triton) kernel, forward and backward.

x [..., D] is viewed as [N, D]. Each program owns `tiles` consecutive tiles of `bm` rows; a tile is
[bm, BD] with BD = next_pow2(D) (Triton tensors have power-of-two shapes; columns >= D are masked).
The backward program accumulates its partial d(scale) over its tiles in registers and writes one
[BD] row; XLA sums the G partial rows. Rounding follows the reference (see pallas_tpu.py).

Verified in Pallas' interpret mode on CPU only; the compiled Triton path has not run on a GPU here.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from polychip.kernels.pallas_common import gpu_options, pallas_kernels

F32 = jnp.float32


def _layout(n_rows: int, d: int):
    bd = pl.next_power_of_2(d)
    bm = max(1, min(16, 8192 // bd))  # ~8K elements per tile keeps a tile in registers
    tiles = max(1, pl.cdiv(pl.cdiv(n_rows, bm), 512))  # at most ~512 programs -> few partial rows
    return bd, bm, tiles


def _load(ref, rows, cols, n_rows, d):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < d)
    return plgpu.load(ref.at[rows[:, None], cols[None, :]], mask=mask, other=0.0).astype(F32), mask


def _fwd_kernel(x_ref, s_ref, o_ref, *, eps, n_rows, d, bd, bm, tiles):
    cols = jnp.arange(bd)
    pid = pl.program_id(0)  # read outside loops: interpret mode cannot lower it inside one
    s = plgpu.load(s_ref.at[cols], mask=cols < d, other=0.0).astype(o_ref.dtype).astype(F32)

    @pl.loop(0, tiles)
    def _(t):
        rows = (pid * tiles + t) * bm + jnp.arange(bm)
        x, mask = _load(x_ref, rows, cols, n_rows, d)
        r = jax.lax.rsqrt(jnp.sum(x * x, axis=1) / d + eps)
        n = (x * r[:, None]).astype(o_ref.dtype).astype(F32)
        plgpu.store(o_ref.at[rows[:, None], cols[None, :]], (n * s[None, :]).astype(o_ref.dtype), mask=mask)


def _bwd_kernel(x_ref, s_ref, dy_ref, dx_ref, ds_ref, *, eps, n_rows, d, bd, bm, tiles):
    cols = jnp.arange(bd)
    pid = pl.program_id(0)
    s = plgpu.load(s_ref.at[cols], mask=cols < d, other=0.0).astype(F32)

    def body(t, ds_acc):
        rows = (pid * tiles + t) * bm + jnp.arange(bm)
        x, mask = _load(x_ref, rows, cols, n_rows, d)
        dy, _ = _load(dy_ref, rows, cols, n_rows, d)
        r = jax.lax.rsqrt(jnp.sum(x * x, axis=1) / d + eps)[:, None]
        n = x * r
        dn = dy * s[None, :]
        dx = r * (dn - n * (jnp.sum(dn * n, axis=1) / d)[:, None])
        plgpu.store(dx_ref.at[rows[:, None], cols[None, :]], dx.astype(dx_ref.dtype), mask=mask)
        return ds_acc + jnp.sum(jnp.where(mask, dy * n, 0.0), axis=0)

    ds = jax.lax.fori_loop(0, tiles, body, jnp.zeros((bd,), F32))
    plgpu.store(ds_ref.at[pid, cols], ds, mask=cols < d)


def _call(kernel, out_shape, grid, interpret, bd, *args):
    return pl.pallas_call(kernel, out_shape=out_shape, grid=grid,
                          **gpu_options(interpret, num_warps=min(max(bd // 256, 1), 8)))(*args)


def _forward(x2, scale, eps, interpret):
    N, D = x2.shape
    bd, bm, tiles = _layout(N, D)
    kern = functools.partial(_fwd_kernel, eps=eps, n_rows=N, d=D, bd=bd, bm=bm, tiles=tiles)
    return _call(kern, jax.ShapeDtypeStruct((N, D), x2.dtype), (pl.cdiv(N, bm * tiles),), interpret, bd, x2, scale)


def _backward(x2, scale, dy, eps, interpret):
    N, D = x2.shape
    bd, bm, tiles = _layout(N, D)
    G = pl.cdiv(N, bm * tiles)
    kern = functools.partial(_bwd_kernel, eps=eps, n_rows=N, d=D, bd=bd, bm=bm, tiles=tiles)
    out = (jax.ShapeDtypeStruct((N, D), x2.dtype), jax.ShapeDtypeStruct((G, D), F32))
    dx, ds = _call(kern, out, (G,), interpret, bd, x2, scale, dy)
    return dx, jnp.sum(ds, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rms(x2, scale, eps, interpret):
    return _forward(x2, scale, eps, interpret)


def _rms_fwd(x2, scale, eps, interpret):
    return _forward(x2, scale, eps, interpret), (x2, scale)


def _rms_bwd(eps, interpret, res, dy):
    x2, scale = res
    dx, ds = _backward(x2, scale, dy, eps, interpret)
    return dx, ds.astype(scale.dtype)


_rms.defvjp(_rms_fwd, _rms_bwd)


def rms_norm(x, scale, *, eps: float = 1e-5, interpret: bool = False):
    """x [..., D], scale [D] -> [..., D] in x's dtype."""
    D = x.shape[-1]
    return _rms(x.reshape(-1, D), scale, float(eps), bool(interpret)).reshape(x.shape)


def _shape_reason(query) -> str | None:
    d = query.get("shape", (0,))[-1]
    if pl.next_power_of_2(d) > 16384:
        return f"feature dim {d} > 16384 does not fit one register tile per row"
    return None


# auto=False until it has run on a GPU: only an override (rms_norm=pallas_gpu) picks it.
KERNELS = pallas_kernels("gpu", rms_norm, priority=20, shape_reason=_shape_reason, auto=False)

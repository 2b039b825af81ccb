"""Grouped matmul as Pallas TPU (Mosaic) kernels with megablox-style tiling (Gale et al. 2022,
"MegaBlocks"; JAX's ops/tpu/megablox is the same design).

Rows are cut into m-tiles of `tm`. A group's rows usually start and end inside a tile, so the grid
walks (group, m-tile) *visits*: every tile a group touches, in row order, one visit per (group, tile)
pair. There are at most tiles_m + G - 1 visits; the actual count depends on group_sizes, so it is a
traced grid dimension, and the visit -> (group, tile) tables ride in SMEM as scalar prefetch.
- gmm (forward, and d lhs with rhs transposed): grid (n-tiles, visits, k-tiles); a visit accumulates
  lhs_tile @ rhs[group] in a float32 VMEM scratch and, at the last k-tile, stores only the rows of
  its group into the output tile (visits to one tile are consecutive, so the tile stays in VMEM).
- tgmm (d rhs = per-group lhs^T @ dout): grid (k-tiles, n-tiles, visits); a visit adds its group's
  rows (others masked to 0) into the accumulator, written to out[group] at the group's last visit.
  Empty groups get one visit that writes zeros.

Rows past sum(group_sizes) are visited by no group and set to 0 outside the kernel.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from polychip.kernels.pallas_common import pallas_kernels, round_up

F32 = jnp.float32


def _tile(dim: int, prefer=(512, 256, 128)) -> int:
    """Largest preferred tile dividing `dim` (lane-aligned), else the whole dimension."""
    return next((t for t in prefer if dim % t == 0), dim)


def tiling(m: int, k: int, n: int, dtype) -> tuple[int, int, int]:
    """(tm, tk, tn): tm <= 128 rows (a multiple of 16, bf16's sublane packing); tk, tn lane-aligned or whole."""
    return min(128, round_up(m, 16)), _tile(k), _tile(n)


def visits(group_sizes, m: int, tm: int, visit_empty: bool):
    """(offsets [G+1], group of each visit, m-tile of each visit, number of visits) for rows sorted by
    group. Visit count is static-bounded by tiles_m + G - 1 (+ G empty ones when visit_empty)."""
    gs = group_sizes.astype(jnp.int32)
    G, tiles_m = gs.shape[0], pl.cdiv(m, tm)
    ends = jnp.cumsum(gs)
    starts = ends - gs
    n_tiles = jnp.where(gs > 0, (ends + tm - 1) // tm - starts // tm, 1 if visit_empty else 0)
    first = jnp.cumsum(n_tiles) - n_tiles
    cap = tiles_m + G - 1 + (G if visit_empty else 0)
    group_of = jnp.repeat(jnp.arange(G, dtype=jnp.int32), n_tiles, total_repeat_length=cap)
    tile_of = jnp.minimum((starts // tm)[group_of] + jnp.arange(cap, dtype=jnp.int32) - first[group_of], tiles_m - 1)
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])
    return offsets, group_of, tile_of.astype(jnp.int32), jnp.sum(n_tiles)


def _rows_in_group(offsets, group_of, tile_of, v, tm, width):
    g = group_of[v]
    row = tile_of[v] * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, width), 0)
    return (row >= offsets[g]) & (row < offsets[g + 1])


def _gmm_kernel(offsets, group_of, tile_of, lhs_ref, rhs_ref, out_ref, acc_ref, *, tm, tn, tiles_k):
    v, kk = pl.program_id(1), pl.program_id(2)

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += jnp.dot(lhs_ref[...], rhs_ref[...], preferred_element_type=F32)

    @pl.when(kk == tiles_k - 1)
    def _():
        mask = _rows_in_group(offsets, group_of, tile_of, v, tm, tn)
        out_ref[...] = jnp.where(mask, acc_ref[...], out_ref[...].astype(F32)).astype(out_ref.dtype)


def gmm(lhs, rhs, group_sizes, *, interpret=False, tiles=None, rows=None):
    """lhs [M, K] @ rhs[group] [G, K, N] -> [M, N] in lhs's dtype (see module docstring). rows: the rows
    expected in groups, for the declared cost (default M; visits to rows in no group do no work)."""
    M, K = lhs.shape
    G, _, N = rhs.shape
    tm, tk, tn = tiles or tiling(M, K, N, lhs.dtype)
    Mp = round_up(M, tm)
    lhs_p = jnp.pad(lhs, ((0, Mp - M), (0, 0)))
    offsets, group_of, tile_of, n_visits = visits(group_sizes, Mp, tm, visit_empty=False)
    tiles_k, tiles_n = K // tk, N // tn
    item = lhs.dtype.itemsize
    R = M if rows is None else min(M, rows)
    out = pl.pallas_call(
        functools.partial(_gmm_kernel, tm=tm, tn=tn, tiles_k=tiles_k),
        out_shape=jax.ShapeDtypeStruct((Mp, N), lhs.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(tiles_n, n_visits, tiles_k),
            in_specs=[pl.BlockSpec((tm, tk), lambda n, v, k, o, g, t: (t[v], k)),
                      pl.BlockSpec((None, tk, tn), lambda n, v, k, o, g, t: (g[v], k, n))],
            out_specs=pl.BlockSpec((tm, tn), lambda n, v, k, o, g, t: (t[v], n)),
            scratch_shapes=[pltpu.VMEM((tm, tn), F32)]),
        # Mosaic calls are opaque to XLA's cost model: this is what the compiler schedules around.
        # lhs is read once per n-tile, each visit reads one group's [K, tn] slab (upper bound: every
        # possible visit), the output is written once.
        cost_estimate=pl.CostEstimate(flops=2 * R * K * N, transcendentals=0,
                                      bytes_accessed=item * (R * K * tiles_n + (-(-R // tm) + G - 1) * K * N + R * N)),
        name="grouped_matmul",
        **_options(interpret, "parallel", "arbitrary", "arbitrary"),
    )(offsets, group_of, tile_of, lhs_p, rhs)
    valid = jnp.arange(M) < offsets[-1]
    return jnp.where(valid[:, None], out[:M], 0).astype(lhs.dtype)


def _tgmm_kernel(offsets, group_of, tile_of, lhs_ref, dy_ref, out_ref, acc_ref, *, tm, tk):
    v, n_visits = pl.program_id(2), pl.num_programs(2)
    first = (v == 0) | (group_of[v] != group_of[jnp.maximum(v - 1, 0)])
    last = (v == n_visits - 1) | (group_of[v] != group_of[jnp.minimum(v + 1, n_visits - 1)])

    @pl.when(first)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    mask = _rows_in_group(offsets, group_of, tile_of, v, tm, tk)
    lhs = jnp.where(mask, lhs_ref[...].astype(F32), 0.0).astype(lhs_ref.dtype)
    acc_ref[...] += jax.lax.dot_general(lhs, dy_ref[...], (((0,), (0,)), ((), ())), preferred_element_type=F32)

    @pl.when(last)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(lhs, dy, group_sizes, n_groups: int, *, interpret=False, tiles=None, rows=None):
    """Per group g: lhs[rows_g]^T @ dy[rows_g] -> [G, K, N] (the rhs gradient of gmm); rows as for gmm."""
    M, K = lhs.shape
    N = dy.shape[1]
    tm, tk, tn = tiles or tiling(M, K, N, lhs.dtype)
    Mp = round_up(M, tm)
    lhs_p, dy_p = jnp.pad(lhs, ((0, Mp - M), (0, 0))), jnp.pad(dy, ((0, Mp - M), (0, 0)))
    offsets, group_of, tile_of, n_visits = visits(group_sizes, Mp, tm, visit_empty=True)
    item = lhs.dtype.itemsize
    R = M if rows is None else min(M, rows)
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm, tk=tk),
        out_shape=jax.ShapeDtypeStruct((n_groups, K, N), lhs.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(K // tk, N // tn, n_visits),
            in_specs=[pl.BlockSpec((tm, tk), lambda k, n, v, o, g, t: (t[v], k)),
                      pl.BlockSpec((tm, tn), lambda k, n, v, o, g, t: (t[v], n))],
            out_specs=pl.BlockSpec((None, tk, tn), lambda k, n, v, o, g, t: (g[v], k, n)),
            scratch_shapes=[pltpu.VMEM((tk, tn), F32)]),
        cost_estimate=pl.CostEstimate(flops=2 * R * K * N, transcendentals=0,
                                      bytes_accessed=item * ((R * K) * (N // tn) + (R * N) * (K // tk)
                                                             + n_groups * K * N)),
        name="grouped_matmul_tgmm",
        **_options(interpret, "parallel", "parallel", "arbitrary"),
    )(offsets, group_of, tile_of, lhs_p, dy_p)


def _options(interpret, *semantics):
    # Not pallas_common.tpu_options: the grid here has a scalar-prefetch spec, and the interpreter
    # needs the same CompilerParams either way.
    return dict(interpret=pltpu.InterpretParams() if interpret else False,
                compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))


def differentiable(gmm_fn, drhs_fn):
    """grouped_matmul(lhs, rhs, group_sizes, *, preferred_element_type, interpret) with a custom VJP:
    forward gmm_fn(lhs, rhs, gs, interpret=), d lhs = gmm_fn(dy, rhs^T), d rhs = drhs_fn(lhs, dy, gs,
    rhs, interpret, rows) (one definition for the TPU and GPU kernels). rows: the api's static hint of
    the rows expected in groups, for declared costs."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
    def f(lhs, rhs, group_sizes, interpret, rows):
        return gmm_fn(lhs, rhs, group_sizes, interpret=interpret, rows=rows)

    def fwd(lhs, rhs, group_sizes, interpret, rows):
        return gmm_fn(lhs, rhs, group_sizes, interpret=interpret, rows=rows), (lhs, rhs, group_sizes)

    def bwd(interpret, rows, res, dy):
        lhs, rhs, group_sizes = res
        dlhs = gmm_fn(dy, jnp.swapaxes(rhs, 1, 2), group_sizes, interpret=interpret, rows=rows)
        return dlhs, drhs_fn(lhs, dy, group_sizes, rhs, interpret, rows).astype(rhs.dtype), None

    f.defvjp(fwd, bwd)

    def grouped_matmul(lhs, rhs, group_sizes, *, preferred_element_type=None, interpret: bool = False,
                       rows: int | None = None):
        """lhs [M, K], rhs [G, K, N], group_sizes [G] -> [M, N] (see api.py)."""
        out = f(lhs, rhs.astype(lhs.dtype), group_sizes.astype(jnp.int32), bool(interpret), rows)
        return out.astype(preferred_element_type or lhs.dtype)

    return grouped_matmul


grouped_matmul = differentiable(
    gmm, lambda lhs, dy, gs, rhs, interpret, rows: tgmm(lhs, dy.astype(lhs.dtype), gs, rhs.shape[0],
                                                        interpret=interpret, rows=rows))


def _shape_reason(query) -> str | None:
    if query.get("dtype") not in ("float32", "bfloat16"):
        return f"dtype {query.get('dtype')} (float32 and bfloat16 only)"
    for d in ("k", "n"):
        v = query.get(d, 128)
        if v % 128 and v > 2048:
            return f"{d}={v} is neither a multiple of 128 nor small enough for one whole-dimension tile"
    return None


KERNELS = pallas_kernels("tpu", grouped_matmul, priority=10, shape_reason=_shape_reason)

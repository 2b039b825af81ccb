"""Grouped matmul as a Pallas GPU (Triton) kernel: the forward product and d lhs.

The same (group, m-tile) visits as the TPU kernel (pallas_tpu.visits), but Triton has no traced grid,
so the grid is the static bound (tiles_m + G - 1 visits) x n-tiles and programs past the real visit
count return at once. A program loops over K in `tk` slabs, accumulating lhs_tile @ rhs[group] in
float32 registers, then stores only its group's rows (a masked store: two groups sharing an m-tile
write disjoint rows, so programs never race). Tiles are powers of two (Triton's rule).

d rhs (a per-group lhs^T @ dy) goes through XLA's ragged dot VJP here; no Triton kernel for it yet.
Verified in Pallas' interpret mode on CPU only; the compiled Triton path has not run on a GPU here.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from polychip.kernels.grouped_matmul.pallas_tpu import differentiable, visits
from polychip.kernels.pallas_common import gpu_options, pallas_kernels, round_up

F32 = jnp.float32


def _pow2_tile(dim: int, cap: int) -> int:
    t = cap
    while t > 16 and dim % t:
        t //= 2
    return t


def _kernel(offsets_ref, group_ref, tile_ref, nv_ref, lhs_ref, rhs_ref, out_ref, *, tm, tk, tn, tiles_k):
    v, n = pl.program_id(0), pl.program_id(1)  # read outside loops: interpret mode cannot lower them inside

    @pl.when(v < nv_ref[0])
    def _():
        g, t = group_ref[v], tile_ref[v]
        rows = t * tm + jnp.arange(tm)
        cols = n * tn + jnp.arange(tn)

        def body(kk, acc):
            ks = kk * tk + jnp.arange(tk)
            a = plgpu.load(lhs_ref.at[rows[:, None], ks[None, :]])
            b = plgpu.load(rhs_ref.at[g, ks[:, None], cols[None, :]])
            return acc + jnp.dot(a, b, preferred_element_type=F32)

        acc = jax.lax.fori_loop(0, tiles_k, body, jnp.zeros((tm, tn), F32))
        mask = (rows >= offsets_ref[g]) & (rows < offsets_ref[g + 1])
        plgpu.store(out_ref.at[rows[:, None], cols[None, :]], acc.astype(out_ref.dtype),
                    mask=jnp.broadcast_to(mask[:, None], (tm, tn)))


def gmm(lhs, rhs, group_sizes, *, interpret=False, rows=None):  # rows: a cost hint (Triton declares none)
    M, K = lhs.shape
    G, _, N = rhs.shape
    tm, tk, tn = 32, _pow2_tile(K, 64), _pow2_tile(N, 64)
    Mp = round_up(M, tm)
    offsets, group_of, tile_of, n_visits = visits(group_sizes, Mp, tm, visit_empty=False)
    out = pl.pallas_call(
        functools.partial(_kernel, tm=tm, tk=tk, tn=tn, tiles_k=K // tk),
        out_shape=jax.ShapeDtypeStruct((Mp, N), lhs.dtype),
        grid=(group_of.shape[0], N // tn),
        name="grouped_matmul",
        **gpu_options(interpret, num_warps=4, num_stages=2),
    )(offsets, group_of, tile_of, n_visits.reshape(1), jnp.pad(lhs, ((0, Mp - M), (0, 0))), rhs)
    return jnp.where((jnp.arange(M) < offsets[-1])[:, None], out[:M], 0).astype(lhs.dtype)


def _drhs(lhs, dy, group_sizes, rhs, interpret, rows=None):
    return jax.vjp(lambda r: jax.lax.ragged_dot(lhs, r, group_sizes), rhs)[1](dy)[0]


grouped_matmul = differentiable(gmm, _drhs)


def _shape_reason(query) -> str | None:
    for d in ("k", "n"):
        if query.get(d, 16) % 16:
            return f"{d}={query.get(d)} is not a multiple of 16 (Triton tiles are powers of two >= 16)"
    return None


# auto=False until it has run on a GPU: only an override (grouped_matmul=pallas_gpu) picks it.
KERNELS = pallas_kernels("gpu", grouped_matmul, priority=20, shape_reason=_shape_reason, auto=False)

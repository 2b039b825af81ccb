"""Grouped matmul as padded tiles and one batched dense matmul, in plain XLA (the CPU path).

XLA:CPU lowers `ragged_dot` to one masked dense product per group: G times the work (measured 10x a
dense matmul of the same rows for 8 groups). Here each group's rows are instead copied into a padded
buffer where every group starts on a `tm`-row tile boundary, each tile is multiplied by its group's
weights in one batched einsum ([tiles, tm, K] x [tiles, K, N], the weights gathered per tile), and
the rows are gathered back. Work: (M + G * tm) * K * N instead of G * M * K * N, plus a [tiles, K, N]
weight gather, so tm is chosen near M / (2G) to balance the two. Gradients are JAX's (scatter/gather
transposes and an einsum)."""
from __future__ import annotations

import jax.numpy as jnp

from polychip.kernels.pallas_common import next_pow2
from polychip.kernels.registry import kernel


def tile_rows(m: int, groups: int) -> int:
    return max(8, min(512, next_pow2(max(1, m // (2 * groups)))))


def grouped_matmul(lhs, rhs, group_sizes, *, preferred_element_type=None, rows=None):
    M, K = lhs.shape
    G, _, N = rhs.shape
    tm = tile_rows(M, G)
    n_tiles = -(-M // tm) + G
    gs = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(gs)
    padded = -(-gs // tm) * tm
    pad_ends = jnp.cumsum(padded)
    row_group = jnp.searchsorted(ends, jnp.arange(M, dtype=jnp.int32), side="right")
    g = jnp.minimum(row_group, G - 1)
    dest = jnp.where(row_group < G, pad_ends[g] - padded[g] + jnp.arange(M) - (ends[g] - gs[g]), n_tiles * tm)
    xp = jnp.zeros((n_tiles * tm, K), lhs.dtype).at[dest].set(lhs, mode="drop", unique_indices=True)
    tile_group = jnp.minimum(jnp.searchsorted(pad_ends, jnp.arange(n_tiles) * tm, side="right"), G - 1)
    y = jnp.einsum("tmk,tkn->tmn", xp.reshape(n_tiles, tm, K), rhs.astype(lhs.dtype)[tile_group],
                   preferred_element_type=preferred_element_type or lhs.dtype)
    return jnp.take(y.reshape(n_tiles * tm, N), dest, axis=0, mode="fill", fill_value=0)


def _cpu_only(target, query):
    return None if target.platform == "cpu" else f"a CPU path (platform {target.platform} has a grouped-matmul emitter)"


KERNELS = (kernel("xla_tiled", grouped_matmul, priority=40, supported_on=_cpu_only,
                  verified="executed in CI (CPU)"),)

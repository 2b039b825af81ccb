"""Grouped (ragged) matmul, the plain-jnp ground truth.

lhs [M, K] rows are sorted by group: rows [offset_g, offset_g + group_sizes[g]) belong to group g, with
offset_g = sum(group_sizes[:g]). out[r] = lhs[r] @ rhs[g(r)]; rows past sum(group_sizes) belong to no
group and are 0. This is a mixture-of-experts layer's expert matmul once tokens are sorted by expert
(Gale et al. 2022, "MegaBlocks", section 3: dropless MoE as block-sparse / grouped matmul).

One masked dense matmul per group, accumulated in float32 at highest precision: G times the work of
the grouped product, but obviously right.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def group_ids(group_sizes, m: int):
    """[M] int32: the group of each row (G for rows past the last group)."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right").astype(jnp.int32)


def grouped_matmul(lhs, rhs, group_sizes, *, preferred_element_type=None, rows=None):
    """lhs [M, K], rhs [G, K, N], group_sizes [G] int32 -> [M, N] in preferred_element_type (lhs's dtype)."""
    out_dtype = preferred_element_type or lhs.dtype
    gid = group_ids(group_sizes, lhs.shape[0])
    out = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)
    for g in range(rhs.shape[0]):
        y = jnp.dot(lhs, rhs[g], preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
        out = jnp.where((gid == g)[:, None], y, out)
    return out.astype(out_dtype)

"""Grouped matmul as XLA's ragged dot (`jax.lax.ragged_dot`): one HLO op every backend lowers (on TPU
to its own grouped-matmul emitter; on CPU and GPU to a loop of dense dots). Its VJP is JAX's (a
ragged dot for d lhs, a ragged-contracting dot for d rhs)."""
from __future__ import annotations

import jax

from polychip.kernels.registry import kernel


def grouped_matmul(lhs, rhs, group_sizes, *, preferred_element_type=None, rows=None):
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype("int32"),
                              preferred_element_type=preferred_element_type or lhs.dtype)


KERNELS = (kernel("xla", grouped_matmul, priority=50, verified="executed in CI (CPU); lowers on every backend"),)

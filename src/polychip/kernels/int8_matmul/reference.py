"""Weight-only int8 matmul in plain jnp: x [M, K] float, q [N, K] int8 (output-major), scale [N] float32
-> x @ (q * scale[:, None]).T, [M, N] float32.

Each output channel has one scale, so it multiplies the [M, N] product instead of the weights (what
model/quant.py's QArray relies on); XLA fuses the int8 -> float conversion into the matmul."""
from __future__ import annotations

import jax.numpy as jnp


def int8_matmul(x, q, scale):
    return jnp.dot(x, q.T.astype(x.dtype), preferred_element_type=jnp.float32) * scale.astype(jnp.float32)

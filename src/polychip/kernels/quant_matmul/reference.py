"""Weight-only quantised matmul in plain jnp: x [M, K] float32 and output-major weights q [N, K], either
int8 with one float32 scale per output channel (scale [N]), bfloat16 bit patterns as uint16 or float32
(scale None) -> x @ dequant(q).T, [M, N] float32.

Each output channel has one scale, so it multiplies the [M, N] product instead of the weights (what
model/quant.py's QArray relies on); XLA fuses the conversion into the matmul."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def dequant(q, dtype):
    """Stored weight values (int8, bfloat16 bits as uint16, or float) in `dtype`. bfloat16 bits widen by a 16-bit
    shift into float32: an integer op XLA CPU fuses into the consuming matmul like the int8 conversion,
    whereas a bfloat16 convert there is rewritten into a bfloat16 dot that the CPU emulates (SmolLM2
    decode: 1.3 tok/s vs 15 for int8). model/quant.py's `upcast` is this function."""
    if q.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(q.astype(jnp.uint32) << 16, jnp.float32).astype(dtype)
    return q.astype(dtype)


def quant_matmul(x, q, scale=None):
    y = jnp.dot(x, dequant(q.T, x.dtype), preferred_element_type=jnp.float32)
    return y if scale is None else y * scale.astype(jnp.float32)

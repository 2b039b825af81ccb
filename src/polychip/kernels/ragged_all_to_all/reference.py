"""ragged_all_to_all as a padded all_to_all (see api.py): runs on every backend, XLA:CPU included."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name: str,
                      max_rows: int):
    n = send_sizes.shape[0]
    j = jnp.arange(max_rows, dtype=jnp.int32)
    rows = jnp.clip(input_offsets[:, None] + j[None, :], 0, operand.shape[0] - 1)  # [n, max_rows]
    sent = (j[None, :] < send_sizes[:, None]).reshape(n, max_rows, *(1,) * (operand.ndim - 1))
    chunks = jnp.where(sent, jnp.take(operand, rows, axis=0), jnp.zeros((), operand.dtype))
    got = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)  # chunk s: what shard s sent here
    at = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # where shard s's rows land here
    dest = jnp.where(j[None, :] < recv_sizes[:, None], at[:, None] + j[None, :], output.shape[0])
    return output.at[dest.reshape(-1)].set(got.reshape(n * max_rows, *operand.shape[1:]), mode="drop",
                                           unique_indices=True)

"""ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name,
max_rows, policy): jax.lax.ragged_all_to_all's semantics, inside shard_map over `axis_name` (n shards).

This shard sends operand[input_offsets[j] : + send_sizes[j]] to shard j, where the rows land at
output[output_offsets[j] : + send_sizes[j]] (an offset in j's output, given by the sender); recv_sizes[j]
is the rows it receives from shard j. Rows of `output` nothing lands on keep their value. The expert-
parallel token exchange of mixture-of-experts layers (model/moe.py), there and back.

Implementations (lower priority number tried first):
  50 xla        jax.lax.ragged_all_to_all: moves only the rows sent   TPU / GPU; deviceless-compiled in CI
 100 reference  a padded all_to_all: every (source, destination) chunk padded to `max_rows` (the static
                bound on one chunk), then scattered into place        executed in CI (CPU, 8 devices)
XLA:CPU has no ragged-all-to-all (UNIMPLEMENTED in its thunk emitter, jax 0.10.2), so CPU runs the
reference. The padded exchange moves n x max_rows rows per shard: with the worst-case bound of an
expert-parallel layer (every pair to one shard) that is n times the rows balanced routing sends.
"""
from __future__ import annotations

from polychip.kernels.ragged_all_to_all import reference
from polychip.kernels.registry import KernelPolicy, declare

# Called per shard (inside the model's shard_map): every argument is this shard's whole array.
OP = declare("ragged_all_to_all", reference=reference.ragged_all_to_all, backends=("xla",),
             args={"operand": (None, ...), "output": (None, ...), "input_offsets": (None,), "send_sizes": (None,),
                   "output_offsets": (None,), "recv_sizes": (None,)})


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name: str,
                      max_rows: int, policy: KernelPolicy):
    query = dict(rows=operand.shape[0], out_rows=output.shape[0], shards=send_sizes.shape[0], dtype=str(operand.dtype))
    return policy.call(OP, operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, query=query,
                       axis_name=axis_name, max_rows=max_rows)

"""grouped_matmul(lhs, rhs, group_sizes, policy): lhs [M, K] rows sorted by group, rhs [G, K, N],
group_sizes [G] int32 -> [M, N] in lhs's dtype; row r is multiplied by its group's rhs, rows past
sum(group_sizes) are 0. The expert matmul of a dropless mixture-of-experts layer (model/moe.py).

Implementations (lower priority number tried first; interpret variants sit after the reference, so
they run only when named in an override):
  10 pallas_tpu            Mosaic, megablox-style tiles (gmm fwd/dlhs, tgmm drhs)  deviceless-compiled in CI
  20 pallas_gpu            Triton tiles (fwd, dlhs; drhs by XLA's ragged dot)       unverified on a GPU (interpret only)
  40 xla_tiled             padded tiles + one batched einsum (CPU targets only)     executed in CI (CPU)
  50 xla                   jax.lax.ragged_dot                                       executed in CI (CPU)
 100 reference             one masked dense matmul per group                        the ground truth
 200 pallas_tpu_interpret  the TPU kernels in TPU interpret mode (CPU)
 210 pallas_gpu_interpret  the GPU kernel in interpret mode (CPU)

The model calls it per shard inside its own expert-parallel shard_map (model/moe.py), so all three
arrays are declared unsharded here.
"""
from __future__ import annotations

from polychip.kernels.grouped_matmul import reference
from polychip.kernels.registry import KernelPolicy, declare

OP = declare("grouped_matmul", reference=reference.grouped_matmul, backends=("pallas_tpu", "pallas_gpu", "xla_tiled", "xla"),
             args={"lhs": (None, None), "rhs": (None, None, None), "group_sizes": (None,)})


def grouped_matmul(lhs, rhs, group_sizes, *, policy: KernelPolicy, rows: int | None = None):
    """rows: a static hint, the rows expected in groups (default all of lhs): kernels declare their cost
    for that many. An expert-parallel receive buffer is padded to the worst case (every pair to one
    shard, model/moe.py), ep times the rows balanced routing sends; the Pallas kernels visit only rows
    in groups, so declaring the padded size overstated their work ep-fold."""
    query = dict(m=lhs.shape[0], k=lhs.shape[1], n=rhs.shape[2], groups=rhs.shape[0], dtype=str(lhs.dtype))
    return policy.call(OP, lhs, rhs, group_sizes, query=query, rows=rows)

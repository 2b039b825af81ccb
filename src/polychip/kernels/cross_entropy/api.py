"""cross_entropy(h, w, labels, mask, policy) -> (loss_sum, count): fused output projection + CE.

h [N, D], w [D, V], labels [N] int, mask [N] -> (sum of masked token losses, number of counted
tokens), both float32 scalars. Implementations (lower priority number tried first; interpret
variants sit after the reference so they run only when named in an override):
  10 pallas_tpu            Mosaic kernels, fwd + dh + dw, no [N, V] logits   deviceless-compiled in CI
  50 xla_chunked           lax.scan over token x vocab chunks + custom_vjp   executed in CI (CPU)
 100 reference             materialises [N, V] float32 logits                 the ground truth
 200 pallas_tpu_interpret  the TPU kernels in TPU interpret mode (CPU)
There is no Pallas GPU kernel: on GPU, xla_chunked runs the tile matmuls on cuBLAS (see README).
"""
from __future__ import annotations

from polychip.kernels.cross_entropy import reference
from polychip.kernels.registry import KernelPolicy, declare

# Per shard: each device takes its own tokens against the whole output projection; the partial loss
# sums and counts are added up across the batch shards.
OP = declare("cross_entropy", reference=reference.cross_entropy, backends=("pallas_tpu", "xla_chunked"),
             args={"h": ("batch", None), "w": (None, None), "labels": ("batch",), "mask": ("batch",)},
             partial_sums=True)


def cross_entropy(h, w, labels, mask, *, policy: KernelPolicy):
    query = dict(n_tokens=h.shape[0], d_model=h.shape[1], vocab=w.shape[1], dtype=str(h.dtype))
    return policy.call(OP, h, w, labels, mask, query=query)

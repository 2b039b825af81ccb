"""cross_entropy(h, w, labels, mask, policy) -> (loss_sum, count): fused output projection + CE.

h [N, D], w [D, V], labels [N], mask [N]. Implementations that never materialise [N, V] logits
register here beside the reference.
"""
from __future__ import annotations

from polychip.kernels.cross_entropy import reference
from polychip.kernels.registry import KernelPolicy, register

OP = "cross_entropy"
register(OP, "reference", priority=100, verified="executed in CI (CPU); the ground truth")(reference.cross_entropy)


def cross_entropy(h, w, labels, mask, *, policy: KernelPolicy):
    impl = policy.pick(OP, n_tokens=h.shape[0], d_model=h.shape[1], vocab=w.shape[1], dtype=str(h.dtype))
    return impl.fn(h, w, labels, mask)

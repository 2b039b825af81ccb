"""rms_norm(x, scale, eps, policy): x [..., D], scale [D] -> [..., D] in x's dtype; registry-selected.

Implementations (lower priority number tried first; interpret variants sit after the reference, so
they run only when named in an override, e.g. `KernelPolicy.create(overrides={"rms_norm":
"pallas_tpu_interpret"})`):
  10 pallas_tpu            Mosaic kernel, fwd+bwd            compiled for TPU deviceless in CI
  20 pallas_gpu            Triton kernel, fwd+bwd            unverified on a GPU (interpret only)
 100 reference             plain jnp                          the ground truth
 200 pallas_tpu_interpret  the TPU kernel in TPU interpret mode (CPU)
 210 pallas_gpu_interpret  the GPU kernel in interpret mode (CPU)
"""
from __future__ import annotations

import functools

from polychip.kernels.registry import KernelPolicy, register
from polychip.kernels.rms_norm import reference

OP = "rms_norm"
register(OP, "reference", priority=100, verified="executed in CI (CPU); the ground truth")(reference.rms_norm)

try:  # Mosaic TPU lowering ships with jax; guard anyway so a broken install drops one entry only.
    from polychip.kernels.rms_norm import pallas_tpu
except ImportError:  # pragma: no cover
    pallas_tpu = None
if pallas_tpu is not None:
    register(OP, "pallas_tpu", priority=10, manual_partition=True, supported_on=pallas_tpu.supported_on,
             verified="TPU interpret mode on CPU + deviceless compile for v5e/v6e/tpu7x in CI")(pallas_tpu.rms_norm)
    register(OP, "pallas_tpu_interpret", priority=200, manual_partition=True, supported_on=pallas_tpu.interpret_supported_on, auto=False,
             verified="executed in CI (CPU, TPU interpret mode)")(
        functools.partial(pallas_tpu.rms_norm, interpret=True))

try:
    from polychip.kernels.rms_norm import pallas_gpu
except ImportError:  # pragma: no cover - no Triton lowering in this jax build
    pallas_gpu = None
if pallas_gpu is not None:
    register(OP, "pallas_gpu", priority=20, manual_partition=True, supported_on=pallas_gpu.supported_on, auto=False,  # not yet run on a GPU
            
             verified="unverified on GPU hardware; interpret mode executed in CI (CPU)")(pallas_gpu.rms_norm)
    register(OP, "pallas_gpu_interpret", priority=210, manual_partition=True, supported_on=pallas_gpu.interpret_supported_on, auto=False,
             verified="executed in CI (CPU, interpret mode)")(functools.partial(pallas_gpu.rms_norm, interpret=True))


def rms_norm(x, scale, *, eps: float, policy: KernelPolicy):
    impl = policy.pick(OP, shape=tuple(x.shape), dtype=str(x.dtype))
    axes = (("batch",) + (None,) * (x.ndim - 1), (None,))
    return policy.per_shard(impl, lambda x, s: impl.fn(x, s, eps=eps), (x, scale), axes)

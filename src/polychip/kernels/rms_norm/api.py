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

from polychip.kernels.registry import KernelPolicy, declare
from polychip.kernels.rms_norm import reference

OP = declare("rms_norm", reference=reference.rms_norm, backends=("pallas_tpu", "pallas_gpu"),
             args={"x": ("batch", "seq", ..., None), "scale": (None,)})  # rows split as the activations are


def rms_norm(x, scale, *, eps: float, policy: KernelPolicy):
    return policy.call(OP, x, scale, query=dict(shape=tuple(x.shape), dtype=str(x.dtype)), eps=eps)

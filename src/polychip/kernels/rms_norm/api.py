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


from polychip.kernels.registry import KernelPolicy, optional_backend, register, register_pallas
from polychip.kernels.rms_norm import reference

OP = "rms_norm"
register(OP, "reference", priority=100, verified="executed in CI (CPU); the ground truth")(reference.rms_norm)

for _backend, _priority, _auto in (("tpu", 10, True), ("gpu", 20, False)):  # GPU: not yet run on a GPU
    _mod = optional_backend(f"polychip.kernels.rms_norm.pallas_{_backend}")
    if _mod is not None:
        register_pallas(OP, _backend, _mod.rms_norm, priority=_priority, supported_on=_mod.supported_on,
                        interpret_supported_on=_mod.interpret_supported_on, auto=_auto,
                        verified={"tpu": 'TPU interpret mode on CPU + deviceless compile for TPU topologies in CI; not run on a TPU', "gpu": 'unverified on GPU hardware (not yet run on a GPU); interpret mode executed in CI (CPU)'}[_backend])


def rms_norm(x, scale, *, eps: float, policy: KernelPolicy):
    impl = policy.pick(OP, shape=tuple(x.shape), dtype=str(x.dtype))
    axes = (("batch",) + (None,) * (x.ndim - 1), (None,))
    return policy.per_shard(impl, lambda x, s: impl.fn(x, s, eps=eps), (x, scale), axes)

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


from polychip.kernels.cross_entropy import reference, xla_chunked
from polychip.kernels.registry import KernelPolicy, optional_backend, register, register_pallas

OP = "cross_entropy"
# manual_partition: chunked per device shard (under SPMD a lax.map over a batch-sharded axis made every
# device walk every chunk with an all-reduce per tile: ~4 TB per step for llama3-8b on v6e-256).
register(OP, "xla_chunked", priority=50, manual_partition=True, verified="executed in CI (CPU)")(xla_chunked.cross_entropy)
register(OP, "reference", priority=100, verified="executed in CI (CPU); the ground truth")(reference.cross_entropy)

for _backend, _priority, _auto in (("tpu", 10, True),):  # no Pallas GPU kernel: xla_chunked uses cuBLAS tiles
    _mod = optional_backend(f"polychip.kernels.cross_entropy.pallas_{_backend}")
    if _mod is not None:
        register_pallas(OP, _backend, _mod.cross_entropy, priority=_priority, supported_on=_mod.supported_on,
                        interpret_supported_on=_mod.interpret_supported_on, auto=_auto,
                        verified={"tpu": 'TPU interpret mode on CPU + deviceless compile for TPU topologies in CI; not run on a TPU', "gpu": 'unverified on GPU hardware (not yet run on a GPU); interpret mode executed in CI (CPU)'}[_backend])


def cross_entropy(h, w, labels, mask, *, policy: KernelPolicy):
    impl = policy.pick(OP, n_tokens=h.shape[0], d_model=h.shape[1], vocab=w.shape[1], dtype=str(h.dtype))
    # Per shard: each device takes its own tokens against the whole output projection; the partial
    # loss sums and counts are added up across the batch shards.
    return policy.per_shard(impl, impl.fn, (h, w, labels, mask), (("batch", None), (None, None), ("batch",), ("batch",)),
                            psum_outputs=True)

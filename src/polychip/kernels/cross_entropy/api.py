"""cross_entropy(h, w, labels, mask, policy) -> (loss_sum, count): fused output projection + CE.

h [N, D], w [D, V], labels [N] int, mask [N] -> (sum of masked token losses, number of counted
tokens), both float32 scalars. Implementations (lower priority number tried first; interpret
variants sit after the reference so they run only when named in an override):
  10 pallas_tpu            Mosaic kernels, fwd + dh + dw, no [N, V] logits   deviceless-compiled in CI
  50 xla_chunked           lax.scan over token x vocab chunks + custom_vjp   executed in CI (CPU)
 100 reference             materialises [N, V] float32 logits                 the ground truth
 200 pallas_tpu_interpret  the TPU kernels in TPU interpret mode (CPU)
When the layout splits the vocab and the logits per device are small, "auto" runs the reference
(`vocab_split_prefers_reference`): the fused kernels would hold the whole projection on every device.
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


def vocab_split_prefers_reference(n_tokens: int, d_model: int, vocab: int, w_itemsize: int, vocab_ways: int,
                                  token_ways: int) -> bool:
    """Whether "auto" should run the reference when the layout splits the vocab (tensor parallelism).

    The fused kernels run per shard with the whole [D, V] output projection on every device (gathered,
    plus its whole gradient); the reference is partitioned by XLA, which keeps W and the [tokens, V]
    logits split over the vocab. The reference wins when its per-device float32 logits, tokens spread over
    the batch / sequence ways, are no larger than the whole projection: for llama3-405b on 2 v6e slices
    (tensor 4) the fused kernel held 3 x 4.2 GB of W per chip and did not fit (32.70 GB); the reference
    fit at 25.81 GB."""
    if vocab_ways <= 1:
        return False
    logits = n_tokens / max(token_ways, 1) * vocab / vocab_ways * 4
    return logits <= d_model * vocab * w_itemsize


def cross_entropy(h, w, labels, mask, *, policy: KernelPolicy):
    N, D = h.shape
    V = w.shape[1]
    query = dict(n_tokens=N, d_model=D, vocab=V, dtype=str(h.dtype))
    if policy.override(OP.name) in (None, "auto") and vocab_split_prefers_reference(
            N, D, V, w.dtype.itemsize, policy.ways("vocab"), policy.ways("batch", "seq")):
        policy = policy.with_overrides(**{OP.name: "reference"})
    return policy.call(OP, h, w, labels, mask, query=query)

"""attention(q, k, v, ...): the public entry point; implementation chosen by the kernel registry.

q [B, T, H, D], k/v [B, S, K, D] (H % K == 0: MHA, GQA, MQA) -> [B, T, H, D].
Options: causal, sliding_window (keys within the last W positions, the query's own included),
soft_cap (logits -> cap * tanh(logits / cap)), q_offset (absolute position of query 0; scalar or
[B], may be traced: decoding against a KV cache), kv_lengths ([B] valid keys).
"""
from __future__ import annotations

import jax.numpy as jnp

from polychip.kernels.attention import reference, xla
from polychip.kernels.registry import KernelPolicy, register

OP = "attention"

# Priority order (lower first): hand-written backends register at 10-40, XLA at 50, reference last.
register(OP, "sdpa", priority=40, supported_on=xla.sdpa_supported_on,
         verified="CPU path executed in CI; cuDNN dispatch needs a GPU (not in CI)")(xla.sdpa)
register(OP, "xla", priority=50, verified="executed in CI (CPU)")(xla.attention)
register(OP, "reference", priority=100, verified="executed in CI (CPU); the ground truth")(reference.attention)
# Pallas backends register themselves on import: pallas_tpu (10), pallas_gpu (20, auto=False until run on
# a GPU) and their CPU interpreters (200, 210, auto=False: only an explicit override selects them).
from polychip.kernels.attention import pallas_gpu, pallas_tpu  # noqa: E402,F401


def attention(q, k, v, *, policy: KernelPolicy, causal=True, sliding_window=None, soft_cap=None, q_offset=None,
              kv_lengths=None):
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} not a multiple of kv heads {k.shape[2]}")
    impl = policy.pick(
        OP, q_len=q.shape[1], kv_len=k.shape[1], n_heads=q.shape[2], n_kv_heads=k.shape[2], head_dim=q.shape[3],
        dtype=str(q.dtype), causal=causal, sliding_window=sliding_window, soft_cap=soft_cap,
        has_q_offset=q_offset is not None, has_kv_lengths=kv_lengths is not None,
    )
    args, axes = [q, k, v], [("batch", None, "act_heads", None)] * 3
    if policy.layout is not None and (policy.layout.spec(axes[0], q.shape)[2] != policy.layout.spec(axes[1], k.shape)[2]):
        axes = [("batch", None, None, None)] * 3  # heads split only when query and KV heads split alike (GQA groups)
    extra = []
    for name, val in (("q_offset", q_offset), ("kv_lengths", kv_lengths)):
        if val is not None:
            val = jnp.asarray(val, jnp.int32)
            extra.append(name)
            args.append(val)
            axes.append(("batch",) if val.ndim == 1 else ())

    def run(q, k, v, *rest):
        opts = dict(zip(extra, rest))
        return impl.call(policy.target, q, k, v, causal=causal, sliding_window=sliding_window, soft_cap=soft_cap,
                         q_offset=opts.get("q_offset"), kv_lengths=opts.get("kv_lengths"))

    return policy.per_shard(impl, run, tuple(args), tuple(axes))

"""attention(q, k, v, ...): the public entry point; implementation chosen by the kernel registry.

q [B, T, H, D], k/v [B, S, K, D] (H % K == 0: MHA, GQA, MQA) -> [B, T, H, D].
Options: causal, sliding_window (keys within the last W positions, the query's own included),
soft_cap (logits -> cap * tanh(logits / cap)), q_offset (absolute position of query 0; scalar or
[B], may be traced: decoding against a KV cache), kv_lengths ([B] valid keys).
"""
from __future__ import annotations

import jax.numpy as jnp

from polychip.kernels.attention import reference
from polychip.kernels.attention.context import SEQ_SPLIT
from polychip.kernels.registry import KernelPolicy, declare

# Priority order (lower first): pallas_tpu 10, pallas_gpu 20 (auto=False until run on a GPU), cpu_ffi 30
# (one-token decode on CPU), sdpa 40, xla 50, reference 100, then the Pallas CPU interpreters (200, 210; only an override selects them).
# Per shard, heads split only when query and KV heads split alike (GQA groups; see shard_specs).
# A `seq` split (the `context` mesh axis) runs as context-parallel attention (context.py).
BTHD = ("batch", "seq", "act_heads", None)
OP = declare("attention", reference=reference.attention, backends=("pallas_tpu", "pallas_gpu", "cpu_ffi", "xla"),
             args={"q": BTHD, "k": BTHD, "v": BTHD, "q_offset": ("batch",), "kv_lengths": ("batch",)},
             seq_split=SEQ_SPLIT)


def attention(q, k, v, *, policy: KernelPolicy, causal=True, sliding_window=None, soft_cap=None, q_offset=None,
              kv_lengths=None):
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads {q.shape[2]} not a multiple of kv heads {k.shape[2]}")
    query = dict(q_len=q.shape[1], kv_len=k.shape[1], n_heads=q.shape[2], n_kv_heads=k.shape[2], head_dim=q.shape[3],
                 dtype=str(q.dtype), causal=causal, sliding_window=sliding_window, soft_cap=soft_cap,
                 has_q_offset=q_offset is not None, has_kv_lengths=kv_lengths is not None)
    as_int = lambda x: None if x is None else jnp.asarray(x, jnp.int32)  # noqa: E731
    return policy.call(OP, q, k, v, query=query, causal=causal, sliding_window=sliding_window, soft_cap=soft_cap,
                       q_offset=as_int(q_offset), kv_lengths=as_int(kv_lengths))

"""XLA's fused attention through `jax.nn.dot_product_attention` (implementation=None lets JAX pick
XLA or, on NVIDIA GPUs, cuDNN). Handles GQA natively. No soft-cap and no traced query offset."""
from __future__ import annotations

import jax


def attention(q, k, v, *, causal=True, sliding_window=None, soft_cap=None, q_offset=None, kv_lengths=None, scale=None):
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal, local_window_size=window,
        key_value_seq_lengths=kv_lengths,
    )


def supported_on(target, query) -> str | None:
    if query.get("soft_cap") is not None:
        return "logit soft-cap is not supported by jax.nn.dot_product_attention"
    if query.get("has_q_offset"):
        return "a query offset (decoding against a cache) is not supported"
    if query.get("q_len") != query.get("kv_len") and query.get("causal", True):
        return "causal masking with q_len != kv_len is not supported"
    return None

"""XLA paths (no hand-written kernel):

- `attention`: the reference's grouped einsum at default matmul precision in the input dtype (XLA
  fuses it; scores/softmax in float32). Runs everywhere, handles every option (traced q_offset too).
- `sdpa`: `jax.nn.dot_product_attention` (implementation=None: XLA, or cuDNN flash attention on NVIDIA
  GPUs). Auto-picked only on GPU: on CPU its backward measured ~2x slower than the einsum path for
  the `small` preset (GQA K/V get repeated), and on TPU the Pallas kernel is preferred.
"""
from __future__ import annotations

import functools

import jax

from polychip.kernels.attention import reference

attention = functools.partial(reference.attention, precision=None)


def sdpa(q, k, v, *, causal=True, sliding_window=None, soft_cap=None, q_offset=None, kv_lengths=None, scale=None):
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=causal, local_window_size=window,
        key_value_seq_lengths=kv_lengths,
    )


def sdpa_supported_on(target, query) -> str | None:
    if target.platform != "gpu":
        return "auto-selected on GPU only (cuDNN); elsewhere the einsum path is as fast or faster"
    return sdpa_supports(query)


def sdpa_supports(query) -> str | None:
    if query.get("soft_cap") is not None:
        return "logit soft-cap is not supported by jax.nn.dot_product_attention"
    if query.get("has_q_offset"):
        return "a query offset (decoding against a cache) is not supported"
    if query.get("q_len") != query.get("kv_len") and query.get("causal", True):
        return "causal masking with q_len != kv_len is not supported"
    return None

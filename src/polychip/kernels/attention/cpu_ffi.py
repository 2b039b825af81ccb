"""One-token decode attention as an AVX-512 C++ kernel (decode_attention.cc) called through XLA's FFI, for
CPUs: q [B, 1, H, D] against a contiguous KV cache k/v [B, S, K, D] read in place, at a traced position.

Why: on a CPU a decode step's attention is small work in many small XLA ops. For SmolLM2 (30 layers, a
256-slot cache) XLA's path copied each layer's K and V into head-major order and ran two batched dots and
a softmax over the whole cache: about 2.5 ms of a 22 ms float32 step (jax.profiler), the rest of which
is the weights streaming. The kernel reads only the keys the query sees (positions up to its own, inside
the window) once, in place.

Only what decoding against `transformer.contiguous_cache_attend`'s cache needs: one query per row, float32,
causal with a query offset, optional sliding window and key lengths; no soft cap, no gradient. Everything
else goes to the XLA path. Built and registered by kernels/native.py (a machine without AVX-512 or g++
gets the reason from `supported_on`).
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from polychip.kernels import native
from polychip.kernels.registry import kernel

SOURCE = Path(__file__).with_name("decode_attention.cc")
TARGET = ("polychip_decode_attention", "DecodeAttention")


def ensure_registered() -> str | None:
    return native.ensure_registered(SOURCE, [TARGET])


def decode_attention(q, k, v, *, causal=True, sliding_window=None, soft_cap=None, q_offset=None, kv_lengths=None,
                     scale=None):
    B, _, H, D = q.shape
    S = k.shape[1]
    qo = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (B,))
    kl = jnp.full((B,), S, jnp.int32) if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
    call = jax.ffi.ffi_call(TARGET[0], jax.ShapeDtypeStruct((B, H, D), jnp.float32))
    o = call(q.reshape(B, H, D), k, v, qo, kl, window=np.int64(sliding_window or 0),
             scale=np.float32(D ** -0.5 if scale is None else scale))
    return o.reshape(B, 1, H, D)


def _supported(target, query) -> str | None:
    if target.platform != "cpu":
        return f"a CPU kernel (target {target.platform})"
    if query.get("q_len") != 1 or not query.get("has_q_offset"):
        return "decoding only: one query per row at a query offset"
    if query.get("dtype") != "float32":
        return f"float32 only, got {query.get('dtype')}"
    if not query.get("causal", True) or query.get("soft_cap"):
        return "causal attention without a soft cap only"
    return ensure_registered()


KERNELS = (kernel("cpu_ffi", decode_attention, priority=30, supported_on=_supported, manual_partition=True,
                  verified="executed in CI (CPU with AVX-512)"),)

"""RMSNorm (Zhang & Sennrich 2019): y = x / sqrt(mean(x^2) + eps) * scale, computed in float32.

x [..., D], scale [D] -> [..., D] in x's dtype. Llama (and HF's LlamaRMSNorm) normalise in fp32,
cast back to the input dtype, then multiply by the weight; we do the same for parity.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x, scale, *, eps: float = 1e-5):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * y.astype(x.dtype)

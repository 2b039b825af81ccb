"""Rotary position embeddings (Su et al. 2021) with Llama-3 frequency scaling.

Uses the "rotate half" layout of Hugging Face's Llama (dimension i pairs with i + D/2), which is the
layout HF checkpoints' q/k weights are permuted for; parity with transformers depends on it.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from polychip.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
    """[head_dim/2] float32 inverse frequencies, Llama-3 scaled when cfg.rope_scaling is set.

    Llama 3.1 scaling (Meta's reference `apply_scaling`): wavelengths shorter than
    orig/high_freq_factor are kept, longer than orig/low_freq_factor are divided by `factor`, and the
    band between is interpolated smoothly.
    """
    D = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, D, 2, dtype=np.float64) / D))
    sc = cfg.rope_scaling
    if sc is None:
        return inv.astype(np.float32)
    low_wavelen = sc.original_max_position_embeddings / sc.low_freq_factor
    high_wavelen = sc.original_max_position_embeddings / sc.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (
        sc.high_freq_factor - sc.low_freq_factor)
    scaled = np.where(wavelen > low_wavelen, inv / sc.factor, inv)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    scaled = np.where(mid, (1 - smooth) * inv / sc.factor + smooth * inv, scaled)
    return scaled.astype(np.float32)


def apply_rope(x, positions, inv_freq):
    """x [B, T, H, D], positions [B, T] int -> x rotated, same dtype (angles in float32)."""
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]  # [B,T,D/2]
    cos = jnp.concatenate([jnp.cos(ang), jnp.cos(ang)], axis=-1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(ang), jnp.sin(ang)], axis=-1)[:, :, None, :]
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rotated * sin).astype(x.dtype)

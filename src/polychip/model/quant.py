"""Weight-only int8 quantisation for serving: per-output-channel symmetric scales.

A quantised matrix is a `QArray` pytree leaf pair: `q` int8 with the weight's shape and `scale` float32
with the weight's shape except the contracted (input) dims, which are kept as size 1, so
`q * scale` broadcasts back to the float weight. Because every output channel has its own scale,
the scale can be applied after the matmul: x @ (q * s) == (x @ q) * s column by column, so the
matmul reads int8 weights (converted to the compute dtype) and multiplies N scales, never a
dequantised [K, N] copy in HBM-sized memory (see transformer.dense).

What is quantised: the seven per-layer projections and the output projection (lm_head, or the tied
embedding, whose rows are the output channels of embed.T, so one scale per vocabulary row serves the
lookup and the projection). Norm weights and biases stay float: they are tiny and precision-critical.

Symmetric round-to-nearest with scale = max|w| / 127 per channel (the LLM.int8() paper's "vector-wise"
weight quantisation, Dettmers et al. 2022, section 3.1, without the outlier decomposition, which
targets activations).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from polychip.config import ConfigError

QUANT_MODES = ("int8",)
#: Load-time dtype names: (parameter dtype before quantisation, compute dtype, quantisation mode or None).
INFERENCE_DTYPES = {
    "float32": ("float32", "float32", None),
    "bfloat16": ("bfloat16", "bfloat16", None),
    "int8": ("float32", "float32", "int8"),
}

# params["layers"] key -> number of leading input dims after the layer axis (see transformer.dense).
_LAYER_IN_DIMS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}


@jax.tree_util.register_dataclass
@dataclass
class QArray:
    """int8 weight `q` and float32 per-output-channel `scale` (contracted dims kept as size 1)."""

    q: Any
    scale: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    @property
    def ndim(self) -> int:
        return len(self.q.shape)

    @property
    def dtype(self):
        return self.q.dtype

    def astype(self, dtype):
        """The dequantised weight in `dtype` (for callers that need the whole matrix)."""
        return self.q.astype(dtype) * self.scale.astype(dtype)

    @property
    def T(self) -> "QArray":
        return QArray(self.q.T, self.scale.T)


def quantize(w, in_axes: tuple[int, ...]) -> QArray:
    """Symmetric int8 with one scale per slice over `in_axes` (the contracted dims). Host or device."""
    xp = np if isinstance(w, np.ndarray) else jnp
    wf = w.astype(xp.float32)
    amax = xp.max(xp.abs(wf), axis=in_axes, keepdims=True)
    scale = xp.where(amax > 0, amax / 127.0, 1.0).astype(xp.float32)
    q = xp.clip(xp.round(wf / scale), -127, 127).astype(xp.int8)
    return QArray(q, scale)


def quantize_params(params: dict, mode: str = "int8") -> dict:
    """A float params tree -> the same tree with the matmul weights as QArrays (see module docstring).

    Works on host (numpy) or device (jax) leaves; returns a new tree, `params` is not modified."""
    if mode not in QUANT_MODES:
        raise ConfigError(f"quantisation {mode!r} is not supported; use one of {', '.join(QUANT_MODES)}")
    if is_quantized(params):
        raise ConfigError("params are already quantised")
    layers = dict(params["layers"])
    for key, n_in in _LAYER_IN_DIMS.items():
        layers[key] = quantize(layers[key], tuple(range(1, 1 + n_in)))  # axis 0 is the layer axis
    out = dict(params, layers=layers)
    if "lm_head" in params:
        out["lm_head"] = quantize(params["lm_head"], (0,))  # [D, V]: one scale per vocabulary column
    else:
        out["embed"] = quantize(params["embed"], (1,))  # [V, D] tied: one scale per row = per output
    return out


def is_quantized(params: dict) -> bool:
    return any(isinstance(x, QArray) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray)))


def inference_dtypes(name: str) -> tuple[str, str, str | None]:
    """A load dtype name ("float32", "bfloat16", "int8") -> (param dtype, compute dtype, quantisation)."""
    if name not in INFERENCE_DTYPES:
        raise ConfigError(f"dtype {name!r} is not supported; use one of {', '.join(INFERENCE_DTYPES)}")
    return INFERENCE_DTYPES[name]

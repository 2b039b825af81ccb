"""Weight-only int8 (per-output-channel symmetric scales) and weight-only bfloat16 for serving.

A quantised matrix is a `QArray`: int8 values `q` and one float32 `scale` per output channel (layout in
its docstring). Because every output channel has its own scale, the scale can be applied after the
matmul: x @ (q * s) == (x @ q) * s column by column, so the matmul reads int8 weights (converted to
the compute dtype) and multiplies N scales, never a dequantised copy (see transformer.dense).

What is quantised: the seven per-layer projections and the output projection (lm_head, or the tied
embedding, whose rows are the output channels of embed.T, so one scale per vocabulary row serves the
lookup and the projection). Norm weights and biases stay float: they are tiny and precision-critical.

Symmetric round-to-nearest with scale = max|w| / 127 per channel (the LLM.int8() paper's "vector-wise"
weight quantisation, Dettmers et al. 2022, section 3.1, without the outlier decomposition, which
targets activations).

Float32 weights laid out output-major ("f32" mode: a QArray of float32 values, no scale) are what
infer.inference_layout gives a float32 model on a CPU, so that its decode matmuls take the same kernel
(nothing is quantised).

Weight-only bfloat16 ("bf16" mode) is the same QArray with bfloat16 values and no scale: what a
`--dtype bfloat16` load means on a CPU, whose XLA backend has no bf16 matmul units and converts a bf16
operand slowly unless the conversion is fused into the matmul, which it is for the output-major
layout (SmolLM2's 49152x576 output projection: 1.8 ms vs 12.3 ms in float32). Accelerators run
bfloat16 compute instead (see `inference_dtypes`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from polychip.config import ConfigError
# A QArray's stored values in a float dtype: the one dequantisation, shared with the kernels' reference.
from polychip.kernels.quant_matmul.reference import dequant as upcast

QUANT_MODES = ("int8", "bf16", "f32")
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
    """A weight of logical shape [*lead, *in_shape, *out_shape] (lead: the stacked layer axis, if any)
    stored output-major: `q` int8 [*lead, N, K] and `scale` float32 [*lead, N], N = prod(out_shape),
    K = prod(in_shape).

    Output-major because XLA's CPU backend fuses the int8 -> float conversion into the matmul when
    the int8 operand is transposed at use ([N, K] read as [K, N]), and materialises a converted copy
    otherwise: a 576x1536 decode matvec measured 68 us vs 187 us, and SmolLM2's 49152x576 output
    projection 1.1 ms vs 101 ms (float32: 4.4 ms). It is also the layout of a tied embedding [V, D],
    so one QArray serves the lookup (rows of q) and the output projection."""

    q: Any
    #: float32 [*lead, N], or None for weight-only bfloat16 (q then holds the bfloat16 bits as uint16) and
    #: for output-major float32 (q float32).
    scale: Any
    in_shape: tuple[int, ...] = field(metadata=dict(static=True))
    out_shape: tuple[int, ...] = field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.q.shape[:-2], *self.in_shape, *self.out_shape)

    @property
    def dtype(self):
        return self.q.dtype

    def astype(self, dtype):
        """The dequantised weight in `dtype`, logical shape (for callers that need the whole matrix)."""
        w = upcast(self.q, dtype)
        if self.scale is not None:
            w = w * self.scale[..., None].astype(dtype)
        return jnp.swapaxes(w, -1, -2).reshape(self.shape)


def bf16_bits(w):
    """float weights -> their bfloat16 roundings' bit patterns as uint16 (see `upcast`)."""
    return jax.lax.bitcast_convert_type(jnp.asarray(w, jnp.float32).astype(jnp.bfloat16), jnp.uint16)


def quantize(w, n_in: int, n_lead: int = 0, mode: str = "int8") -> QArray:
    """Symmetric int8 of a logical [*lead, *in, *out] weight with one scale per output channel (the
    max |w| over the n_in contracted dims / 127), or ("bf16") the weight in bfloat16, or ("f32") in
    float32, output-major.
    Host (numpy) or device (jax) arrays."""
    xp = np if isinstance(w, np.ndarray) else jnp
    lead, ins, outs = w.shape[:n_lead], w.shape[n_lead:n_lead + n_in], w.shape[n_lead + n_in:]
    wf = xp.swapaxes(w.astype(xp.float32).reshape(*lead, math.prod(ins), math.prod(outs)), -1, -2)
    if mode == "bf16":
        return QArray(bf16_bits(wf), None, tuple(ins), tuple(outs))
    if mode == "f32":
        return QArray(wf, None, tuple(ins), tuple(outs))
    amax = xp.max(xp.abs(wf), axis=-1)
    scale = xp.where(amax > 0, amax / 127.0, 1.0).astype(xp.float32)
    q = xp.clip(xp.round(wf / scale[..., None]), -127, 127).astype(xp.int8)
    return QArray(q, scale, tuple(ins), tuple(outs))


def quantize_params(params: dict, mode: str = "int8") -> dict:
    """A float params tree -> the same tree with the matmul weights as QArrays (see module docstring).
    A tied embedding [V, D] becomes the QArray of its output projection (logical [D, V]).

    Works on host (numpy) or device (jax) leaves; returns a new tree, `params` is not modified."""
    if mode not in QUANT_MODES:
        raise ConfigError(f"quantisation {mode!r} is not supported; use one of {', '.join(QUANT_MODES)}")
    if is_quantized(params):
        raise ConfigError("params are already quantised")
    layers = dict(params["layers"])
    for key, n_in in _LAYER_IN_DIMS.items():
        if key in layers:  # a mixture-of-experts layer has its experts' weights instead of the MLP's
            layers[key] = quantize(layers[key], n_in, n_lead=1, mode=mode)
    out = dict(params, layers=layers)
    if "lm_head" in params:
        out["lm_head"] = quantize(params["lm_head"], 1, mode=mode)  # [D, V]
        if mode == "bf16":
            out["embed"] = quantize(params["embed"].T, 1, mode=mode)  # lookup rows: the tied layout
    else:
        out["embed"] = quantize(params["embed"].T, 1, mode=mode)  # [V, D] -> logical [D, V], stored [V, D]
    return out


def is_quantized(params: dict) -> bool:
    return any(isinstance(x, QArray) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray)))


def inference_dtypes(name: str, platform: str | None = None) -> tuple[str, str, str | None]:
    """A load dtype name ("float32", "bfloat16", "int8") -> (param dtype, compute dtype, quantisation).

    bfloat16 on a CPU (platform None: JAX's default backend, decided once at load) is weight-only:
    bfloat16 weights, float32 compute (module docstring); elsewhere bfloat16 weights and compute."""
    if name not in INFERENCE_DTYPES:
        raise ConfigError(f"dtype {name!r} is not supported; use one of {', '.join(INFERENCE_DTYPES)}")
    if name == "bfloat16" and (platform or jax.default_backend()) == "cpu":
        return ("float32", "float32", "bf16")
    return INFERENCE_DTYPES[name]

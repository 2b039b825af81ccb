"""FLOPs of attention kernels that declare no cost, inferred from their operand shapes.

MaxText's splash attention (jax.experimental.pallas.ops.tpu.splash_attention) and JAX's Pallas flash
attention reach the HLO as custom calls without `cost_estimate`; charged for their bytes alone they drop a
model's attention FLOPs (issue 14). A call is taken for attention when its instruction or JAX op name says
so (splash / flash / mha / attention), and counted from q [..., Sq, D] and k [..., Skv, D] (its first two
floating operands of rank >= 3; K/V may have fewer heads, GQA: the work is per query head):

    one matmul unit U = 2 x (elements of q / D) x Skv x D x (fraction of score tiles computed)
    forward 2U (Q K^T, P V); dq kernel 3U (recompute S, dP = dO V^T, dQ = dS K);
    dkv kernel 4U (S, dP, dV = P^T dO, dK = dS^T Q); fused backward (dkv kernel that also returns dq,
    or a kernel named bwd) 5U.

Causal when the name says "causal" or the caller says the model's attention is causal (the HLO keeps the
mask's values elided): the tiles on or below the diagonal run, at the kernel's block sizes when its
xprof_metadata gives them (block_q, block_kv: a 4 x 4 grid runs 10 of 16 tiles), else half. Otherwise all
tiles count (an upper bound). Anything else stays opaque.
"""
from __future__ import annotations

import math
import re

_ATTENTION = re.compile(r"splash|flash|mha|attention", re.I)
_FLOAT = re.compile(r"^(bf16|f16|f32|f8\w*)\[")


def _name_text(name: str, attrs: str) -> str:
    """The instruction's name and the last two parts of its JAX op name (the kernel's, then pallas_call)."""
    m = re.search(r'op_name="([^"]*)"', attrs)
    return name + (" " + "/".join(m.group(1).split("/")[-2:]) if m else "")


def _dims(t: str) -> list[int]:
    m = re.match(r"^\w+\[([0-9,]*)\]", t.strip())
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _block(attrs: str, keys: tuple[str, ...]) -> int | None:
    """The first of `keys` given as an integer in the kernel's xprof_metadata (JSON inside a string)."""
    for k in keys:
        m = re.search(rf'\\?"{k}\\?":\s*(\d+)', attrs)
        if m:
            return int(m.group(1))
    return None


def causal_fraction(sq: int, skv: int, bq: int | None, bkv: int | None) -> float:
    """Fraction of (bq x bkv) score tiles a causal kernel computes: those with some key at or before
    some query (bottom-right aligned when Skv > Sq is not assumed: queries and keys start together)."""
    if not bq or not bkv or sq % bq or skv % bkv:
        return 0.5
    nq, nk = sq // bq, skv // bkv
    run = sum(min(nk, ((i + 1) * bq - 1) // bkv + 1) for i in range(nq))
    return run / (nq * nk)


def attention_flops(name: str, attrs: str, operand_types: list[str], result_types: list[str],
                    causal: bool = False) -> float | None:
    """Inferred FLOPs of one attention kernel call, or None when it is not recognisably attention."""
    text = _name_text(name, attrs)
    if not _ATTENTION.search(text):
        return None
    arrays = [_dims(t) for t in operand_types if _FLOAT.match(t.strip())]
    arrays = [d for d in arrays if len(d) >= 3]
    if len(arrays) < 2 or arrays[0][-1] != arrays[1][-1]:
        return None
    q, k = arrays[0], arrays[1]
    sq, skv, d = q[-2], k[-2], q[-1]
    low = text.lower()
    if "dkv" in low:
        big = [r for r in result_types if len(_dims(r)) >= 3 and _dims(r)[-1] == d
               and math.prod(_dims(r)) >= math.prod(k)]
        units, keys = (5 if len(big) >= 3 else 4), (("block_q_dkv", "block_q"), ("block_kv_dkv", "block_kv"))
    elif "dq" in low:
        units, keys = 3, (("block_q_dq", "block_q"), ("block_kv_dq", "block_kv"))
    elif "bwd" in low:
        units, keys = 5, (("block_q_dkv", "block_q"), ("block_kv_dkv", "block_kv"))
    else:
        units, keys = 2, (("block_q",), ("block_kv",))
    frac = 1.0
    if causal or "causal" in low:
        frac = causal_fraction(sq, skv, _block(attrs, keys[0]), _block(attrs, keys[1]))
    return units * 2.0 * (math.prod(q) // d) * skv * d * frac

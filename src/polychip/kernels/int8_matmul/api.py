"""int8_matmul(x, q, scale, policy): x [M, K] float32, q [N, K] int8, scale [N] float32 -> [M, N] float32,
x @ (q * scale[:, None]).T: the matmuls of a weight-only int8 model (model/quant.py, transformer.dense).

Implementations (lower priority number tried first):
  30 cpu_ffi     AVX-512 C++ kernel through XLA's FFI, few rows (decode)   executed in CI (CPU)
 100 reference   XLA: int8 converted inside the dot, then the scales        the ground truth

Arrays are declared unsplit: the FFI kernel runs on one device's whole operands (per shard on a mesh).
"""
from __future__ import annotations

from polychip.kernels.int8_matmul import reference
from polychip.kernels.registry import KernelPolicy, declare

OP = declare("int8_matmul", reference=reference.int8_matmul, backends=("cpu_ffi",),
             args={"x": (None, None), "q": (None, None), "scale": (None,)})


def int8_matmul(x, q, scale, *, policy: KernelPolicy):
    query = dict(m=x.shape[0], k=x.shape[1], n=q.shape[0], dtype=str(x.dtype))
    return policy.call(OP, x, q, scale, query=query)

"""quant_matmul(x, q, scale, policy): x [M, K] float32, q [N, K] int8 with scale [N] float32, or q [N, K]
bfloat16 bits as uint16 or float32 with scale None -> [M, N] float32, x @ dequant(q).T: the matmuls of a
weight-only int8 or bfloat16 model, or of a float32 model laid out output-major for CPU decoding
(model/quant.py's QArray, infer.inference_layout, transformer.dense).

Implementations (lower priority number tried first):
  30 cpu_ffi     AVX-512 C++ kernels through XLA's FFI, few rows (decode),   executed in CI (CPU)
                 rows split over the CPUs
 100 reference   XLA: the weights converted inside the dot, then the scales  the ground truth

Arrays are declared unsplit: the FFI kernel runs on one device's whole operands (per shard on a mesh).
"""
from __future__ import annotations

from polychip.kernels.quant_matmul import reference
from polychip.kernels.registry import KernelPolicy, declare

OP = declare("quant_matmul", reference=reference.quant_matmul, backends=("cpu_ffi",),
             args={"x": (None, None), "q": (None, None), "scale": (None,)})


def quant_matmul(x, q, scale=None, *, policy: KernelPolicy):
    query = dict(m=x.shape[0], k=x.shape[1], n=q.shape[0], dtype=str(x.dtype), weights=str(q.dtype))
    return policy.call(OP, x, q, scale=scale, query=query)

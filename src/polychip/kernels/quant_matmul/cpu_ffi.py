"""The weight-only matmul as AVX-512 C++ kernels (quant_matmul.cc: int8 + scales, bfloat16 bits, float32)
called through XLA's FFI, for CPUs.

Why: XLA's CPU backend fuses the int8 (or bfloat16-bits) -> float32 conversion into the dot but emits it
as a scalar-ish loop (about 5 GMAC/s on one core here), so weight-only int8 and bfloat16 decoding of
SmolLM2 were barely faster than float32. The kernel widens each 16 weights in registers and keeps R
activation rows x NB weight rows of float32 accumulators in flight, prefetches the weight rows ahead in
software, and splits the output rows over helper threads (at most the CPUs XLA's intra-op pool has, at
most $POLYCHIP_CPU_KERNEL_THREADS). Decode decides the speed: one step reads every weight once, so the
kernel's job is to stream bytes at the memory's speed. Measured here (2 cores; one core reads about
14 GB/s from DRAM, two about 28 GB/s), SmolLM2's decode matmuls, all of them: int8 17.2 -> 6.6 ms on
one thread with the prefetch (the interleaved rows had defeated the hardware prefetcher); the whole
float32 decode step 27.0 -> 22.2 ms on two threads against XLA's one-row dots (output-major float32 weights,
infer.inference_layout), which is 537 MB of weights at about 26 GB/s.

It is used for few rows (M <= MAX_ROWS for the weight type: decode steps, small batches); beyond, XLA's
GEMM is faster (it converts int8 and bfloat16 weights slowly, so those keep the kernel longer). Built
and registered by kernels/native.py; a machine without g++, without AVX-512 or whose build fails gets the
reason from `supported_on` and the reference runs instead. Inference only: the custom call has no
gradient.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from polychip.config import ConfigError
from polychip.kernels import native
from polychip.kernels.registry import kernel

SOURCE = Path(__file__).with_name("quant_matmul.cc")
#: FFI target per stored weight dtype: (target name, symbol in the library).
TARGETS = {"int8": ("polychip_int8_matmul", "Int8Matmul"), "uint16": ("polychip_bf16_matmul", "Bf16Matmul"),
           "float32": ("polychip_f32_matmul", "F32Matmul")}
#: Most activation rows sent to the kernel per stored weight type; beyond, XLA's GEMM is faster. SmolLM2's
#: float32 serving step, kernel vs XLA: 25.7 vs 33.7 ms at 1 row, 51.4 vs 54.9 at 8, 90.7 vs 73.7 at 16;
#: int8 at 16 rows: 67.6 vs 189 ms.
MAX_ROWS = {"int8": 16, "uint16": 16, "float32": 8}
#: Environment variable capping the threads of one kernel call (see max_threads).
THREADS_ENV = "POLYCHIP_CPU_KERNEL_THREADS"


def ensure_registered() -> str | None:
    """Build (once per cache) and register the FFI targets; None when usable, else the reason."""
    return native.ensure_registered(SOURCE, TARGETS.values())


def max_threads() -> int:
    """Most threads one kernel call uses: $POLYCHIP_CPU_KERNEL_THREADS when set to a positive integer,
    else 0 (no limit but XLA's intra-op pool, i.e. the CPUs this process may run on)."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return 0
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{THREADS_ENV}={raw!r}: expected a positive integer (threads per CPU kernel call)")
    return int(raw)


def quant_matmul(x, q, scale=None):
    out = jax.ShapeDtypeStruct((x.shape[0], q.shape[0]), jnp.float32)
    call = jax.ffi.ffi_call(TARGETS[str(q.dtype)][0], out)
    args = (x, q) if scale is None else (x, q, scale.astype(jnp.float32))
    return call(*args, max_threads=np.int32(max_threads()))


def _supported(target, query) -> str | None:
    if target.platform != "cpu":
        return f"a CPU kernel (target {target.platform})"
    if query["dtype"] != "float32":
        return f"float32 activations only, got {query['dtype']}"
    if query["weights"] not in TARGETS:
        return f"int8, bfloat16-bits (uint16) or float32 weights only, got {query['weights']}"
    if query["m"] > MAX_ROWS[query["weights"]]:
        return f"{query['m']} rows: above {MAX_ROWS[query['weights']]} XLA's GEMM is faster"
    return ensure_registered()


KERNELS = (kernel("cpu_ffi", quant_matmul, priority=30, supported_on=_supported, manual_partition=True,
                  verified="executed in CI (CPU with AVX-512)"),)

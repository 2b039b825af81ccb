"""The weight-only quantised matmul as AVX-512 C++ kernels (quant_matmul.cc: int8 + scales, bfloat16)
called through XLA's FFI, for CPUs.

Why: XLA's CPU backend fuses the int8 (or bfloat16-bits) -> float32 conversion into the dot but emits it
as a scalar-ish loop (about 5 GMAC/s on one core here), so weight-only int8 and bfloat16 decoding of
SmolLM2 were barely faster than float32 (whose dots run at memory speed). The kernel widens each 16 weights in registers and keeps
R activation rows x NB weight rows of float32 accumulators in flight, so it runs at the speed the bytes
arrive. One core, M = 1, 576 x 1536 weights, medians of 50 calls: 57-65 us, against 149-183 us for
XLA's int8 path and 250-290 us for float32 (bench/generate.py shows the effect on a whole model).

It is used for few rows (M <= MAX_ROWS: decode steps, small batches); at prefill sizes XLA's GEMM is
faster. Built on first use with the system C++ compiler into polychip's cache (keyed by the source,
flags and jaxlib version), then registered as an FFI target; a machine without g++, without AVX-512 or
whose build fails gets the reason from `supported_on` and the reference runs instead. Inference only:
the custom call has no gradient.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from polychip.files import cache_dir
from polychip.hardware.detect import cpuinfo_field
from polychip.kernels.registry import kernel

SOURCE = Path(__file__).with_name("quant_matmul.cc")
#: FFI target per stored weight dtype: (target name, symbol in the library).
TARGETS = {"int8": ("polychip_int8_matmul", "Int8Matmul"), "uint16": ("polychip_bf16_matmul", "Bf16Matmul")}
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-w")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "fma")
#: Most activation rows sent to the kernel (beyond, XLA's GEMM reuses each weight across more rows).
MAX_ROWS = 16
_state: dict[str, str | None] = {}  # "reason": None once built and registered, else why not


def _missing_cpu_flags() -> list[str]:
    have = set((cpuinfo_field("flags") or "").split())
    return [f for f in CPU_FLAGS if f not in have]


def library_path() -> Path:
    import jaxlib

    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + jaxlib.__version__.encode()).hexdigest()
    return cache_dir("kernels") / f"quant_matmul-{key[:16]}.so"


def _build(out: Path) -> None:
    """Compile to a temporary file beside `out`, then rename (concurrent builders never see half a file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run(["g++", *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp], check=True,
                       capture_output=True, text=True, timeout=300)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def ensure_registered() -> str | None:
    """Build (once per cache) and register the FFI target; None when usable, else the reason."""
    if "reason" in _state:
        return _state["reason"]
    reason = None
    missing = _missing_cpu_flags()
    if missing:
        reason = f"this CPU lacks {', '.join(missing)}"
    elif shutil.which("g++") is None:
        reason = "no g++ to build the kernel"
    else:
        try:
            path = library_path()
            if not path.is_file():
                _build(path)
            lib = ctypes.cdll.LoadLibrary(str(path))
            for name, symbol in TARGETS.values():
                jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            reason = f"building the kernel failed: {detail.strip().splitlines()[-1] if detail.strip() else e}"
    _state["reason"] = reason
    return reason


def quant_matmul(x, q, scale=None):
    out = jax.ShapeDtypeStruct((x.shape[0], q.shape[0]), jnp.float32)
    call = jax.ffi.ffi_call(TARGETS[str(q.dtype)][0], out)
    return call(x, q) if scale is None else call(x, q, scale.astype(jnp.float32))


def _supported(target, query) -> str | None:
    if target.platform != "cpu":
        return f"a CPU kernel (target {target.platform})"
    if query["dtype"] != "float32":
        return f"float32 activations only, got {query['dtype']}"
    if query["weights"] not in TARGETS:
        return f"int8 or bfloat16-bits (uint16) weights only, got {query['weights']}"
    if query["m"] > MAX_ROWS:
        return f"{query['m']} rows: above {MAX_ROWS} XLA's GEMM is faster"
    return ensure_registered()


KERNELS = (kernel("cpu_ffi", quant_matmul, priority=30, supported_on=_supported, manual_partition=True,
                  verified="executed in CI (CPU with AVX-512)"),)

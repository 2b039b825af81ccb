"""Helpers every Pallas backend shares: block arithmetic, interpret-mode wiring, and registration.

Each Pallas kernel is registered twice (`pallas_kernels`): as `pallas_<backend>` for its hardware,
and as `pallas_<backend>_interpret`, the same function with `interpret=True`. Interpret mode runs the
kernel on CPU (Mosaic's TPU interpreter models TPU memory spaces; the generic interpreter stands in
for Triton), which is how CI verifies kernels without the chip; it is a CPU verification path, so it
is `auto=False` and needs a CPU target. Both are custom calls XLA cannot partition, so both run per
shard on a multi-device mesh (`manual_partition`).
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable

from jax.experimental import pallas as pl

from polychip.kernels.registry import Impl, Target, kernel

VERIFIED = {
    "tpu": "TPU interpret mode on CPU + deviceless compile for TPU topologies in CI; not run on a TPU",
    "gpu": "unverified on GPU hardware (not yet run on a GPU); interpret mode executed in CI (CPU)",
}
_LABEL = {"tpu": "Pallas TPU (Mosaic)", "gpu": "Pallas GPU (Triton)"}
_TOOLCHAIN = {"tpu": "jax.experimental.pallas.tpu", "gpu": "jax.experimental.pallas.triton"}
#: Interpreter entries sit after the reference (priority 100), so "auto" never reaches them.
INTERPRET_OFFSET = 190


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def tpu_options(interpret: bool, *semantics: str, vmem_limit_bytes: int | None = None) -> dict:
    """pallas_call keywords for a Mosaic kernel: its grid's dimension semantics and, when asked, the
    TPU interpreter (which runs on CPU)."""
    from jax.experimental.pallas import tpu as pltpu

    return dict(interpret=pltpu.InterpretParams() if interpret else False,
                compiler_params=pltpu.CompilerParams(dimension_semantics=semantics,
                                                     vmem_limit_bytes=vmem_limit_bytes))


def gpu_options(interpret: bool, num_warps: int, num_stages: int | None = None) -> dict:
    """pallas_call keywords for a Triton kernel; `interpret` runs the generic Pallas interpreter."""
    from jax.experimental.pallas import triton as plgpu

    return dict(interpret=bool(interpret),
                compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages))


def _platform_check(backend: str, interpret: bool, shape_reason: Callable[[dict], str | None]):
    def supported_on(target: Target, query: dict) -> str | None:
        if interpret and target.platform != "cpu":
            return f"{backend.upper()} interpret mode is a CPU verification path (target is {target.platform})"
        if not interpret and target.platform != backend:
            return f"{_LABEL[backend]} kernel needs platform {backend}, not {target.platform}"
        return shape_reason(query)

    return supported_on


def pallas_kernels(backend: str, fn: Callable, *, priority: int, shape_reason: Callable[[dict], str | None] = None,
                   auto: bool = True, wants_device_kind: bool = False, verified: str | None = None) -> tuple[Impl, Impl]:
    """`pallas_<backend>` (fn on its platform) and `pallas_<backend>_interpret` (fn(..., interpret=True)
    on a CPU target), both refusing queries `shape_reason(query)` gives a reason for. Raises
    ImportError when the backend's toolchain is missing, so the op registers neither."""
    importlib.import_module(_TOOLCHAIN[backend])
    shape_reason = shape_reason or (lambda query: None)
    return (
        kernel(f"pallas_{backend}", fn, priority=priority, supported_on=_platform_check(backend, False, shape_reason),
               verified=verified or VERIFIED[backend], auto=auto, wants_device_kind=wants_device_kind,
               manual_partition=True),
        kernel(f"pallas_{backend}_interpret", functools.partial(fn, interpret=True), priority=priority + INTERPRET_OFFSET,
               supported_on=_platform_check(backend, True, shape_reason), auto=False, manual_partition=True,
               verified=f"executed in CI (CPU, {'Mosaic TPU' if backend == 'tpu' else 'Pallas'} interpreter)"),
    )

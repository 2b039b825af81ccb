"""Hand-written CPU kernels in C++, called through XLA's FFI: the one build-and-register mechanism for
every such kernel (quant_matmul/quant_matmul.cc, attention/decode_attention.cc).

A source is compiled on first use with the system g++ into polychip's cache (keyed by the source, the
flags and the jaxlib version; written to a temporary file, then renamed, so concurrent builders never
see half a library), loaded, and its handlers registered as FFI targets for the CPU platform. A machine
without AVX-512, without g++ or whose build fails gets the reason instead, and the op's registry falls
back to its XLA path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable

import jax

from polychip.files import cache_dir
from polychip.hardware.detect import cpuinfo_field

FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-pthread", "-w")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "fma")
_state: dict[Path, str | None] = {}  # source -> None once built and registered, else why not


def _missing_cpu_flags() -> list[str]:
    have = set((cpuinfo_field("flags") or "").split())
    return [f for f in CPU_FLAGS if f not in have]


def library_path(source: Path) -> Path:
    import jaxlib

    key = hashlib.sha256(source.read_bytes() + " ".join(FLAGS).encode() + jaxlib.__version__.encode()).hexdigest()
    return cache_dir("kernels") / f"{source.stem}-{key[:16]}.so"


def _build(source: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run(["g++", *FLAGS, f"-I{jax.ffi.include_dir()}", str(source), "-o", tmp], check=True,
                       capture_output=True, text=True, timeout=300)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def ensure_registered(source: Path, targets: Iterable[tuple[str, str]]) -> str | None:
    """Build `source` (once per cache) and register its (FFI target name, library symbol) pairs; None when
    usable, else the reason. Decided once per process and source."""
    if source in _state:
        return _state[source]
    reason = None
    missing = _missing_cpu_flags()
    if missing:
        reason = f"this CPU lacks {', '.join(missing)}"
    elif shutil.which("g++") is None:
        reason = "no g++ to build the kernel"
    else:
        try:
            path = library_path(source)
            if not path.is_file():
                _build(source, path)
            lib = ctypes.cdll.LoadLibrary(str(path))
            for name, symbol in targets:
                jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            reason = f"building the kernel failed: {detail.strip().splitlines()[-1] if detail.strip() else e}"
    _state[source] = reason
    return reason

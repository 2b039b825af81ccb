"""Which chip is this process running on, and (for CPUs) what is its measured peak.

`current_chip(device)` looks the device's `device_kind` up in the catalog. CPUs have no catalog
entry: their peak is measured once by timing a large jitted matmul and cached in
`$POLYCHIP_CACHE_DIR/cpu_peak.json` (default ~/.cache/polychip), keyed by CPU model, usable core
count and JAX version. An accelerator the catalog does not know gets a Chip with no peak and a
warning, so MFU reads n/a instead of crashing.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
import warnings
from pathlib import Path

from polychip.files import atomic_write_json, cache_dir
from polychip.hardware.catalog import Chip, canonical_dtype, chip_for_device_kind

#: Square matmul size for the CPU measurement: 2 * 2048**3 = 17 GFLOP per call, large enough that
#: dispatch overhead is < 1% and small enough (48 MiB of fp32 operands) to measure in seconds.
MATMUL_N = 2048
REPEATS = 5


def cpuinfo_field(name: str) -> str | None:
    """The value of the first `name` line of /proc/cpuinfo ("model name", "flags", ...); None where the
    file is unreadable (not Linux) or has no such line."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    return cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown-cpu"


def _core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_cache_key() -> str:
    import jax

    return f"{_cpu_model()}|cores={_core_count()}|jax={jax.__version__}"


def measure_cpu_matmul_flops(dtype: str = "float32", n: int = MATMUL_N, repeats: int = REPEATS) -> float:
    """Best-of-`repeats` FLOP/s of an (n, n) @ (n, n) jitted matmul on the CPU backend (no cache)."""
    import jax
    import jax.numpy as jnp

    cpu = jax.devices("cpu")[0]
    dt = jnp.dtype(canonical_dtype(dtype))
    key_a, key_b = jax.random.split(jax.random.key(0))
    with jax.default_device(cpu):
        a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dt)
        b = jax.random.normal(key_b, (n, n), jnp.float32).astype(dt)
        f = jax.jit(lambda x, y: x @ y)
        f(a, b).block_until_ready()  # compile + warm caches
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            f(a, b).block_until_ready()
            best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def cpu_peak_flops(dtype: str = "float32") -> float:
    """Measured matmul FLOP/s of this CPU for `dtype`, measured once per machine and cached."""
    dt = canonical_dtype(dtype)
    path = cache_dir() / "cpu_peak.json"
    key = cpu_cache_key()
    cache = _read_cache(path)
    entry = cache.get(key, {})
    val = entry.get(dt) if isinstance(entry, dict) else None
    if isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val) and val > 0:
        return float(val)
    flops = measure_cpu_matmul_flops(dt)
    cache = _read_cache(path)  # re-read: another process may have added entries meanwhile
    if not isinstance(cache.get(key), dict):
        cache[key] = {}
    cache[key][dt] = flops
    try:
        atomic_write_json(path, cache)
    except OSError as e:
        # The figure is only a cache: a read-only or full cache folder costs a re-measure next run.
        warnings.warn(f"could not cache the CPU peak in {path} ({e.strerror or e}); it will be measured again",
                      stacklevel=2)
    return flops


def cpu_chip(dtype: str = "float32") -> Chip:
    """A synthetic Chip for this CPU whose peak is the measured `dtype` matmul rate.

    When `dtype` is float32 the same figure is also entered for bfloat16: XLA's CPU backend has no
    faster bf16 matrix path on common x86 builds, so a bf16 run's MFU is compared with the fastest
    matmul rate this CPU reached (it is not flattered by a slower bf16 measurement).
    """
    dt = canonical_dtype(dtype)
    flops = cpu_peak_flops(dt)
    peaks = {dt: flops}
    if dt == "float32":
        peaks["bfloat16"] = flops
    return Chip(
        name="cpu", vendor="host", family="cpu", peak_flops=peaks, hbm_bytes=None, hbm_bandwidth=None,
        link_bandwidth=None, scaleout_bandwidth=None, power_w=None, chips_per_host=1, price_per_hour=None, price_date=None,
        sources=(f"measured: best of {REPEATS} jitted {MATMUL_N}x{MATMUL_N} {dt} matmuls ({cpu_cache_key()})",),
        uncertain=("power_w", "hbm_bandwidth"),
        uncertain_why={"power_w": "not measured", "hbm_bandwidth": "not measured"},
        device_kinds=(), display=f"CPU ({_cpu_model()}, {_core_count()} cores)",
    )


def unknown_chip(kind: str) -> Chip:
    return Chip(
        name=f"unknown:{kind}", vendor="unknown", family="unknown", peak_flops={}, hbm_bytes=None,
        hbm_bandwidth=None, link_bandwidth=None, scaleout_bandwidth=None, power_w=None, chips_per_host=1, price_per_hour=None,
        price_date=None, sources=(f"not in catalog: device_kind {kind!r}",),
        uncertain=("peak",), uncertain_why={"peak": "device kind not in the catalog"},
        device_kinds=(kind,), display=kind,
    )


def current_chip(device=None) -> Chip:
    """The Chip for `device` (default: jax.devices()[0]). Never raises for an unknown chip."""
    if device is None:
        import jax

        device = jax.devices()[0]
    if device.platform == "cpu":
        return cpu_chip("float32")
    kind = str(getattr(device, "device_kind", "") or "")
    chip = chip_for_device_kind(kind)
    if chip is None:
        warnings.warn(f"device kind {kind!r} ({device.platform}) is not in the chip catalog: peak FLOP/s "
                      "unknown, MFU will read n/a (add it with --catalog my.yaml)", stacklevel=2)
        return unknown_chip(kind)
    return chip

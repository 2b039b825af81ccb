"""Build the device mesh (axes MESH_AXES) from MeshConfig and a device list."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from jax.sharding import Mesh

from polychip.config import MeshConfig
from polychip.parallel.sharding import MESH_AXES, ShardingError


def resolve_shape(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """Fill the one -1 axis so that the product of the axes == n_devices; clear errors otherwise."""
    sizes = {a: getattr(cfg, a) for a in MESH_AXES}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ShardingError(f"only one mesh axis may be -1 (got {', '.join(free)})")
    for k, v in sizes.items():
        if v == 0 or v < -1:
            raise ShardingError(f"mesh.{k}={v} must be a positive size or -1")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n_devices % fixed:
            raise ShardingError(
                f"mesh {_fmt(sizes)} cannot fill {n_devices} devices: {n_devices} is not divisible by {fixed}"
            )
        sizes[free[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ShardingError(f"mesh {_fmt(sizes)} has {fixed} devices but {n_devices} are available")
    return sizes


def _fmt(sizes: dict) -> str:
    return "x".join(f"{k}={v}" for k, v in sizes.items())


def make_mesh(cfg: MeshConfig, devices: Sequence | None = None) -> Mesh:
    """A Mesh over `devices` (default: all devices of all processes) with axes MESH_AXES.

    The tensor axis is innermost so that tensor-parallel groups sit on neighbouring devices (same host,
    fastest links); data is outermost (across hosts / slices).
    """
    import jax

    devs = list(devices) if devices is not None else jax.devices()
    if cfg.num_devices:
        if cfg.num_devices > len(devs) or cfg.num_devices < 0:
            raise ShardingError(f"mesh.num_devices={cfg.num_devices} but {len(devs)} devices are available")
        if jax.process_count() > 1 and cfg.num_devices != len(devs):
            raise ShardingError("mesh.num_devices must cover every device in a multi-process run")
        devs = devs[: cfg.num_devices]
    sizes = resolve_shape(cfg, len(devs))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices=devs, allow_split_physical_axes=True)
    except Exception:  # topology-aware placement is best effort (CPU and abstract devices)
        arr = np.asarray(devs, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES)

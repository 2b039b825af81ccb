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


def dcn_shape(cfg: MeshConfig, sizes: dict[str, int]) -> dict[str, int]:
    """How many slices each mesh axis spans: cfg.dcn_axes, outermost first, each taking the largest share
    of the remaining slices that divides its size. Axes not in dcn_axes span 1 (they stay inside a slice)."""
    if cfg.slices < 1:
        raise ShardingError(f"mesh.slices={cfg.slices} must be >= 1")
    out, left = {a: 1 for a in MESH_AXES}, cfg.slices
    for a in cfg.dcn_axes:
        if a not in sizes:
            raise ShardingError(f"mesh.dcn_axes names {a!r}; mesh axes are {', '.join(MESH_AXES)}")
        out[a] = math.gcd(left, sizes[a])
        left //= out[a]
    if left != 1:
        across = " x ".join(f"{a}={sizes[a]}" for a in cfg.dcn_axes)
        raise ShardingError(f"mesh.slices={cfg.slices} cannot be spread over the DCN axes {across}: their sizes must "
                            f"be multiples of the slices (e.g. mesh.data={cfg.slices * sizes[cfg.dcn_axes[0]]})"
                            if cfg.dcn_axes else "mesh.dcn_axes is empty but mesh.slices > 1")
    return out


def make_mesh(cfg: MeshConfig, devices: Sequence | None = None) -> Mesh:
    """A Mesh over `devices` (default: all devices of all processes) with axes MESH_AXES.

    The tensor axis is innermost so that tensor-parallel groups sit on neighbouring devices (same host,
    fastest links); data is outermost (across hosts / slices). With mesh.slices > 1 the dcn_axes are
    split across slices first (`dcn_shape`), so that only their collectives (the data axis: gradient
    reductions) cross the data-centre network.
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
    if cfg.slices > 1:
        return Mesh(_hybrid(sizes, dcn_shape(cfg, sizes), devs), MESH_AXES)
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices=devs, allow_split_physical_axes=True)
    except Exception:  # topology-aware placement is best effort (CPU and abstract devices)
        arr = np.asarray(devs, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES)


def _hybrid(sizes: dict[str, int], dcn: dict[str, int], devs: list) -> np.ndarray:
    """Devices arranged so that each axis index is (slice part, in-slice part), slice part outermost.

    Devices that know their slice (TPU `slice_index`, also on deviceless topologies) go through JAX's
    create_hybrid_device_mesh. Others (CPU, GPU nodes without it) are cut into `slices` contiguous groups
    in device order, each group one slice: right for processes that enumerate their local devices
    together, and the only information there is."""
    ici = tuple(sizes[a] // dcn[a] for a in MESH_AXES)
    dcn_t = tuple(dcn[a] for a in MESH_AXES)
    n_slices = math.prod(dcn_t)
    if len(devs) % n_slices:
        raise ShardingError(f"{len(devs)} devices cannot form {n_slices} equal slices")
    if all(getattr(d, "slice_index", None) is not None for d in devs):
        from jax.experimental import mesh_utils

        try:
            return mesh_utils.create_hybrid_device_mesh(ici, dcn_t, devices=devs, allow_split_physical_axes=True)
        except ValueError as e:
            raise ShardingError(f"cannot lay mesh {_fmt(sizes)} over {n_slices} slices: {e}") from None
    groups = np.asarray(devs, dtype=object).reshape(dcn_t + ici)
    k = len(MESH_AXES)
    # (dcn_0, ..., dcn_k, ici_0, ..., ici_k) -> (dcn_0, ici_0, dcn_1, ici_1, ...) -> each axis dcn * ici
    order = [j for i in range(k) for j in (i, k + i)]
    return groups.transpose(order).reshape(tuple(sizes[a] for a in MESH_AXES))

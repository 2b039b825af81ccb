"""Compile targets and mesh specs: `v6e:16x16`, `tpu7x:4x4x4`, `v5e:2x2*2` (2 slices), `h100:8`.

TPU targets name a topology the deviceless compiler knows (`<prefix>:<shape>`, prefix from the chip
catalog's `topology_prefix`), optionally `*N` for N slices joined over the data-centre network. Other
catalog chips take a chip count (`h100:8`, `trn2:16`): no compiler for them is reachable here, so their
report is modelled.

libtpu reads a few environment variables when it first loads and prints warnings when they are
missing (it is looking for the TPU host it runs on). A deviceless compile has no such host, so
`tpu_devices` sets harmless values (only where unset) just before libtpu is loaded; that is the only
place this package touches the environment.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from polychip.compile.errors import CompileError
from polychip.hardware.catalog import Chip, HardwareError, load_catalog, get_chip
from polychip.parallel.sharding import MESH_AXES


@dataclass(frozen=True)
class TargetSpec:
    """A parsed target. n_devices counts JAX devices (tpu7x and v4 topologies show 2 per chip)."""

    text: str
    chip: Chip
    #: "tpu" (deviceless compile) or "modelled" (analytic roofline).
    kind: str
    #: Topology name for get_topology_desc (without the slice count), e.g. "v6e:16x16"; None if modelled.
    topology: str | None
    num_slices: int
    n_chips: int

    @property
    def devices_per_chip(self) -> int:
        return self.chip.topology_devices_per_chip if self.kind == "tpu" else self.chip.devices_per_chip

    @property
    def n_devices(self) -> int:
        return self.n_chips * self.devices_per_chip

    @property
    def hbm_per_device(self) -> float | None:
        return None if self.chip.hbm_bytes is None else self.chip.hbm_bytes / self.devices_per_chip


def tpu_prefixes() -> dict[str, Chip]:
    return {c.topology_prefix: c for c in load_catalog().values() if c.topology_prefix}


def _valid_targets_text() -> str:
    tpus = ", ".join(f"{p}:<shape> (e.g. {_example(p)})" for p in sorted(tpu_prefixes()))
    others = ", ".join(sorted(n for n, c in load_catalog().items() if not c.topology_prefix and c.family != "cpu"))
    return f"TPU topologies {tpus}, optionally '*N' for N slices; modelled chips <name>:<count> for {others}"


def _example(prefix: str) -> str:
    return {"v4": "v4:2x2x1", "v5p": "v5p:2x2x1", "tpu7x": "tpu7x:4x4x4", "v6e": "v6e:16x16"}.get(prefix, f"{prefix}:2x2")


def parse_target(text: str) -> TargetSpec:
    """'v6e:16x16' / 'v5e:2x2*2' / 'h100:8' -> TargetSpec. Unknown or malformed -> CompileError listing what is valid."""
    s = str(text).strip()
    if ":" not in s:
        raise CompileError(f"target {text!r} needs a shape or count after ':'; valid: {_valid_targets_text()}")
    name, rest = s.split(":", 1)
    prefixes = tpu_prefixes()
    key = name.strip().lower()
    if key in prefixes:
        m = re.fullmatch(r"(\d+(?:x\d+){1,2})(?:\*(\d+))?", rest.strip().lower())
        if not m:
            raise CompileError(f"target {text!r}: TPU shape must look like {_example(key)} (optionally *N slices)")
        dims = [int(d) for d in m.group(1).split("x")]
        slices = int(m.group(2) or 1)
        if min(dims) < 1 or slices < 1:
            raise CompileError(f"target {text!r}: every dimension and the slice count must be >= 1")
        return TargetSpec(s, prefixes[key], "tpu", f"{key}:{m.group(1)}", slices, math.prod(dims) * slices)
    try:
        chip = get_chip(key)
    except HardwareError:
        raise CompileError(f"unknown target {text!r}; valid: {_valid_targets_text()}") from None
    if chip.topology_prefix:
        raise CompileError(f"target {text!r}: {chip.name} is a TPU; write its topology, e.g. {_example(chip.topology_prefix)}")
    if chip.family == "cpu":
        raise CompileError(f"target {text!r}: compile targets accelerators; valid: {_valid_targets_text()}")
    if not rest.strip().isdigit() or int(rest) < 1:
        raise CompileError(f"target {text!r}: give a chip count, e.g. {chip.name}:8")
    return TargetSpec(s, chip, "modelled", None, 1, int(rest))


# ----------------------------------------------------------------------------------------------
# TPU topologies (deviceless)
# ----------------------------------------------------------------------------------------------
_TOPOLOGY_CACHE: dict[tuple[str, int], list] = {}


def _quiet_libtpu() -> None:
    """Values libtpu otherwise goes looking for (metadata server, worker list) and warns about."""
    # Deviceless compiles open no TPU, so several processes (tests, other users) may load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    # Only names the (absent) attached host; the topology passed to the compiler decides the target.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")


def tpu_devices(spec: TargetSpec) -> list:
    """The target topology's compile-only devices (no TPU needed; works under JAX_PLATFORMS=cpu)."""
    if spec.kind != "tpu":
        raise CompileError(f"target {spec.text!r} is modelled; it has no deviceless compiler")
    key = (spec.topology, spec.num_slices)
    if key in _TOPOLOGY_CACHE:
        return _TOPOLOGY_CACHE[key]
    _quiet_libtpu()
    from jax.experimental import topologies

    kw = {"num_slices": spec.num_slices} if spec.num_slices > 1 else {}
    try:
        desc = topologies.get_topology_desc(topology_name=spec.topology, platform="tpu", **kw)
    except Exception as e:  # noqa: BLE001 - libtpu raises JaxRuntimeError with the reason
        msg = str(e)
        if "chips_per_host_bounds" in msg:
            # Slices smaller than one default host (v5e:1x1, v6e:2x1): the host is the slice.
            dims = [int(d) for d in spec.topology.split(":")[1].split("x")]
            bounds = (dims + [1, 1, 1])[:3]
            try:
                desc = topologies.get_topology_desc(topology_name=spec.topology, platform="tpu",
                                                    chips_per_host_bounds=bounds, **kw)
            except Exception as e2:  # noqa: BLE001
                raise CompileError(f"the TPU compiler rejects topology {spec.text!r}: {_first_line(e2)}") from None
        else:
            raise CompileError(f"the TPU compiler rejects topology {spec.text!r}: {_first_line(e)}") from None
    devs = list(desc.devices)
    expect = spec.n_devices
    if len(devs) != expect:
        # Trust the compiler, but say so: the catalog's devices-per-chip figure disagrees.
        raise CompileError(f"topology {spec.text!r} has {len(devs)} devices; the catalog expects {expect} "
                           f"({spec.n_chips} chips x {spec.devices_per_chip}) - fix topology_devices_per_chip")
    _TOPOLOGY_CACHE[key] = devs
    return devs


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


# ----------------------------------------------------------------------------------------------
# Mesh specs
# ----------------------------------------------------------------------------------------------
def factorizations(n: int, axes: tuple[str, ...] = ("fsdp", "tensor")) -> list[dict[str, int]]:
    """Every assignment of sizes to `axes` whose product is n (used in errors and by --search)."""
    out: list[dict[str, int]] = []

    def rec(i: int, left: int, cur: dict):
        if i == len(axes) - 1:
            out.append({**cur, axes[i]: left})
            return
        for d in range(1, left + 1):
            if left % d == 0:
                rec(i + 1, left // d, {**cur, axes[i]: d})

    rec(0, n, {})
    return out


def fmt_mesh(sizes: dict[str, int]) -> str:
    return ",".join(f"{a}={sizes[a]}" for a in MESH_AXES if sizes.get(a, 1) != 1) or "fsdp=1"


def parse_mesh(text: str | None, n_devices: int, slices: int = 1) -> dict[str, int]:
    """'fsdp=256' / 'data=2,fsdp=64,tensor=2' -> {data, fsdp, tensor}; axes left out are 1, except that
    with no spec at all everything goes to fsdp (and, over several slices, data = one replica per
    slice). The product must be n_devices; over slices, data x stage (the axes crossing the
    data-centre network: gradient reductions and pipeline hand-offs) must be a multiple of the slice count."""
    if not text:
        return {"data": slices, "fsdp": n_devices // slices, "tensor": 1}
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}  # plus any other mesh axis the spec names (stage, context)
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        if "=" not in part:
            raise CompileError(f"mesh {text!r}: each part must look like axis=size (axes: {', '.join(MESH_AXES)})")
        k, v = part.split("=", 1)
        if k not in MESH_AXES:
            raise CompileError(f"mesh {text!r}: unknown axis {k!r}; axes are {', '.join(MESH_AXES)}")
        if not v.isdigit() or int(v) < 1:
            raise CompileError(f"mesh {text!r}: {k} must be a positive integer, got {v!r}")
        sizes[k] = int(v)
    prod = math.prod(sizes.values())
    if prod != n_devices:
        examples = [fmt_mesh({"data": 1, **f}) for f in sorted(factorizations(n_devices), key=lambda f: f["tensor"])]
        more = "" if len(examples) <= 12 else f" (and {len(examples) - 12} more, plus data=... splits)"
        raise CompileError(f"mesh {text!r} uses {prod} devices but the target has {n_devices}; "
                           f"valid (fsdp x tensor) meshes: {'; '.join(examples[:12])}{more}")
    left = slices
    for a in ("data", "stage"):  # the axes that may cross slices, outermost first (MeshConfig.dcn_axes)
        left //= math.gcd(left, sizes.get(a, 1))
    if left != 1:
        raise CompileError(f"mesh {text!r}: the target has {slices} slices joined by the data-centre network, which "
                           f"only the data and stage axes cross; data x stage = "
                           f"{sizes['data'] * sizes.get('stage', 1)} must be a multiple of {slices}")
    return sizes


def check_batch(batch: int, grad_accum: int, sizes: dict[str, int]) -> None:
    """The micro-batch (batch / grad_accum) must split evenly over the batch axes (data x fsdp)."""
    div = sizes["data"] * sizes["fsdp"]
    if batch % grad_accum:
        raise CompileError(f"batch {batch} is not divisible by train.grad_accum={grad_accum}")
    micro = batch // grad_accum
    if micro % div:
        ok = [div * k * grad_accum for k in range(1, 5)]
        raise CompileError(f"batch {batch} (micro-batch {micro} with grad_accum={grad_accum}) is not divisible by the "
                           f"batch axes data x fsdp = {div} of mesh {fmt_mesh(sizes)}; valid batches: "
                           f"{', '.join(map(str, ok))}, ... (multiples of {div * grad_accum})")

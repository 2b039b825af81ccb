"""The operation record both front ends produce, and the one cost function that turns ops into a step time.

Front ends: `compile` walks the compiled HLO (a fusion, custom call or Pallas kernel is one Op, loop trip
counts in `count`); `plan` builds the same records analytically from the model config and the parallel
layout. Both call `estimate_step` with the same `Machine` and `Calibration`, so one program on one target
gets one step time whichever front end produced it.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

#: Link names: within a slice / node (TPU ICI, NVLink, NeuronLink) and across slices / nodes
#: (TPU DCN, InfiniBand, EFA).
INTRA, INTER = "intra", "inter"
#: The device's host link (PCIe): activations offloaded to host memory go out and come back over it.
HOST = "host"


@dataclass(frozen=True)
class Op:
    """One operation of a step, per device.

    kind "compute": `flops` and `bytes` (HBM read + written) for one execution.
    kind "collective": `bytes` one device sends for one execution, over `link` (INTRA, INTER or HOST);
    `collective` names it (all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute;
    on HOST: host-out / host-in for one direction, host-transfer for traffic already counted as the busier
    direction's bytes).
    `count` is executions per step (loop trip counts multiplied). `source` says where the figures come
    from: "hlo" (the compiled program's shapes), "declared" (a Pallas kernel's CostEstimate),
    "inferred" (an attention kernel with no declared cost, FLOPs from its q / k shapes: estimate.kernels),
    "opaque" (a custom call that declares no cost: its HBM bytes only, no FLOPs; reports list these),
    "analytic" (the planner's op list).
    """

    name: str
    kind: str = "compute"
    flops: float = 0.0
    bytes: float = 0.0
    count: float = 1.0
    link: str = ""
    collective: str = ""
    source: str = "hlo"
    #: The op's matrix-unit rate relative to the machine's peak: 2.0 for an fp8 matmul on a chip whose
    #: float8 peak is twice its bfloat16 peak (estimate.analytic, `dtype="float8"`); 1.0 otherwise.
    peak_scale: float = 1.0
    #: A collective the very next op waits on (tensor-parallel activations between dependent matmuls):
    #: no compute runs beside it, so the overlap rule never hides it.
    blocking: bool = False


@dataclass(frozen=True)
class Machine:
    """What the estimator needs of one device: FLOP/s and bytes/s."""

    peak_flops: float
    hbm_bandwidth: float
    #: bytes/s one device sends within a slice / node; None: unknown (collectives then cannot be costed).
    intra_bandwidth: float | None
    #: bytes/s one device sends across slices / nodes; None: unknown.
    inter_bandwidth: float | None
    name: str = ""
    #: bytes/s one device moves to or from host memory (PCIe, one direction); None: unknown (host
    #: transfers then cannot be costed).
    host_bandwidth: float | None = None


@dataclass(frozen=True)
class Calibration:
    """Achieved fractions of the peaks, fitted on programs with published measured step times.

    The defaults (all 1.0, no overlap) are the uncalibrated roofline; `band` is the validated relative
    error (leave-one-out median |error|) of the fit that produced these numbers, None when uncalibrated.
    """

    compute_efficiency: float = 1.0
    memory_efficiency: float = 1.0
    link_efficiency: float = 1.0
    #: Fraction of collective time hidden under compute (async collectives overlap the layer's matmuls).
    overlap: float = 0.0
    band: float | None = None
    source: str = "uncalibrated roofline"


@dataclass
class StepEstimate:
    """A step time and its parts (seconds per step, per device)."""

    t_step: float
    t_compute: float  # sum over compute ops of max(compute time, memory time)
    t_flops: float  # the compute-bound part of t_compute's terms
    t_memory: float  # the memory-bound part of t_compute's terms
    t_collectives: float  # all collective time before overlap
    t_exposed_collectives: float  # what overlap leaves on the critical path
    by_link: dict = field(default_factory=dict)
    #: The largest contributors: [(op name, seconds per step)].
    top_ops: list = field(default_factory=list)
    band: float | None = None
    label: str = "estimate"

    @property
    def bound(self) -> str:
        parts = {"compute": self.t_flops, "HBM": self.t_memory, "collectives": self.t_exposed_collectives}
        return max(parts.items(), key=lambda kv: kv[1])[0]


def machine_for(chip, dtype: str = "bfloat16") -> Machine:
    """A catalog Chip as the estimator's per-device Machine (chip figures divided among its devices)."""
    d = chip.devices_per_chip
    peak = chip.peak(dtype)
    if peak is None or chip.hbm_bandwidth is None:
        raise ValueError(f"{chip.name}: no {dtype} peak or HBM bandwidth in the catalog; cannot estimate")
    return Machine(
        peak_flops=peak / d, hbm_bandwidth=chip.hbm_bandwidth / d,
        intra_bandwidth=None if chip.link_bandwidth is None else chip.link_bandwidth / d,
        inter_bandwidth=None if chip.scaleout_bandwidth is None else chip.scaleout_bandwidth / d,
        name=chip.name)


def host_link_time(by_way: dict) -> float:
    """Seconds the host link is busy: PCIe is full duplex, so copies out (host-out) and back (host-in)
    travel on separate lanes and the busier direction sets the time; undirected traffic adds to it."""
    out, back = by_way.get("host-out", 0.0), by_way.get("host-in", 0.0)
    return max(out, back) + sum(v for k, v in by_way.items() if k not in ("host-out", "host-in"))


def exposed_time(t_network: float, t_host: float, t_compute: float, overlap: float) -> float:
    """Collective time left on the critical path: network (INTRA + INTER, one after the other) and host
    transfers run concurrently, each hidden under up to `overlap` x the compute time."""
    hidden = overlap * t_compute
    return max(t_network - hidden, t_host - hidden, 0.0)


def estimate_step(ops: list[Op], m: Machine, cal: Calibration = Calibration(), top: int = 8) -> StepEstimate:
    """Sum over ops: compute ops cost max(flops / (peak x eff), bytes / (HBM bw x eff)); collectives cost
    bytes / (link bw x eff) (host transfers: the busier direction, `host_link_time`). Overlap rule: up to `cal.overlap` x the compute time hides collectives; the
    rest is exposed and adds to the step. Host transfers (link HOST) use the PCIe link, a resource of its
    own that runs concurrently with the network: the step exposes the larger of the two remainders.
    Blocking collectives (`Op.blocking`) are exposed whole."""
    peak, bw = m.peak_flops * cal.compute_efficiency, m.hbm_bandwidth * cal.memory_efficiency
    t_fl = t_mem = t_block = 0.0
    by_link: dict = defaultdict(float)
    host_ways: dict = defaultdict(float)
    per_op: dict = defaultdict(float)
    for op in ops:
        if op.kind == "collective":
            link_bw = {INTER: m.inter_bandwidth, HOST: m.host_bandwidth}.get(op.link, m.intra_bandwidth)
            if not link_bw:
                raise ValueError(f"{m.name}: no {op.link or INTRA} link bandwidth; cannot cost {op.name}")
            t = op.count * op.bytes / (link_bw * cal.link_efficiency)
            if op.link == HOST:
                host_ways[op.collective] += t
            else:
                by_link[op.link or INTRA] += t
            t_block += t if op.blocking else 0.0
        else:
            tf, tm = op.flops / (peak * op.peak_scale), op.bytes / bw
            t = op.count * max(tf, tm)
            if tf >= tm:
                t_fl += t
            else:
                t_mem += t
        per_op[op.name] += t
    if host_ways:
        by_link[HOST] = host_link_time(host_ways)
    t_compute = t_fl + t_mem
    t_coll = sum(by_link.values())
    host = by_link.get(HOST, 0.0)
    exposed = t_block + exposed_time(t_coll - host - t_block, host, t_compute, cal.overlap)
    tops = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
    return StepEstimate(t_step=t_compute + exposed, t_compute=t_compute, t_flops=t_fl, t_memory=t_mem,
                        t_collectives=t_coll, t_exposed_collectives=exposed, by_link=dict(by_link),
                        top_ops=tops, band=cal.band)

"""Totals of a compiled (per-device, post-partitioning) module for the report, from the estimator's op walk.

XLA's `cost_analysis()` counts each while-loop body once, and our step is two nested loops (gradient
accumulation over micro-batches, layers under scan). `polychip.estimate.hlo` walks the optimised module
from the entry with loop trip counts applied and returns one Op per fusion / custom call / collective;
this module keeps those ops (the report's step-time estimate is computed from them) and sums them into:
- collective bytes per device by kind, as the ring-algorithm traffic each device sends;
- HBM traffic per device: operand + result bytes of every top-level instruction (dynamic-(update-)slices
  charged for the slice), with and without loop trips.
Both are estimates from the compiled program's own shapes, labelled so in the report.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field

from polychip.estimate.hlo import walk_module
from polychip.estimate.ops import INTER, Op


@dataclass
class HloStats:
    """Per-device figures of one compiled module (see module docstring)."""

    #: [(body computation, trip count)] for every while loop reached from the entry.
    loops: list = field(default_factory=list)
    #: kind -> bytes each device sends per step (loop trips included).
    collective_bytes: dict = field(default_factory=dict)
    #: The part of collective_bytes that crosses slices (DCN), by kind.
    dcn_collective_bytes: dict = field(default_factory=dict)
    #: HBM bytes read + written per step (loop trips included).
    hbm_traffic_bytes: float = 0.0
    #: The same walk with every loop body counted once (comparable with cost_analysis' "bytes accessed").
    hbm_traffic_bytes_loops_once: float = 0.0
    #: Largest HBM traffic contributors: [(op, bytes)], loop trips included.
    traffic_by_op: list = field(default_factory=list)
    #: The estimator's ops (estimate.Op as dicts), loop trips in "count".
    ops: list = field(default_factory=list)

    @property
    def collective_total(self) -> float:
        return float(sum(self.collective_bytes.values()))


def ops_of(stats: dict) -> list[Op]:
    """The estimator ops stored in an HloStats dict (as CompiledStep.hlo holds it)."""
    return [Op(**d) for d in stats.get("ops", [])]


def analyse(text: str, n_devices: int, devices_per_slice: int | None = None) -> HloStats:
    # polychip compiles causal decoders only: an attention kernel with no declared cost (its FLOPs
    # inferred from shapes) is counted with the causal mask.
    ops, loops = walk_module(text, n_devices, devices_per_slice, attention_causal=True)
    once, _ = walk_module(text, n_devices, devices_per_slice, loop_trips=False)
    coll: dict[str, float] = defaultdict(float)
    dcn: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    for o in ops:
        if o.kind == "collective":
            coll[o.collective] += o.bytes * o.count
            if o.link == INTER:
                dcn[o.collective] += o.bytes * o.count
        else:
            by_op[o.name] += o.bytes * o.count
    return HloStats(loops=loops, collective_bytes=dict(coll), dcn_collective_bytes=dict(dcn),
                    hbm_traffic_bytes=sum(o.bytes * o.count for o in ops if o.kind == "compute"),
                    hbm_traffic_bytes_loops_once=sum(o.bytes * o.count for o in once if o.kind == "compute"),
                    traffic_by_op=sorted(by_op.items(), key=lambda kv: -kv[1])[:8],
                    ops=[dataclasses.asdict(o) for o in ops])

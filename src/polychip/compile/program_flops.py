"""Matmul FLOPs of the traced step program (the jaxpr), with loop trip counts.

Why: XLA's `cost_analysis()` counts the body of every while loop once. Our layers run under
`lax.scan` (and gradient accumulation is a second scan), so the compiler's FLOP count for a 32-layer
model covers about one layer. Walking the jaxpr instead gives every `dot_general` of the real step,
multiplied by the `length` of each enclosing scan, including the recompute that remat adds and the
masked-out half of a dense causal attention: the FLOPs the hardware is asked to do (global, all
devices together), not the model FLOPs of `polychip.model.flops`.

Only dot_general (and conv) are counted; elementwise work is < 1-2% at these shapes. A Pallas kernel
(pallas_call) counts the FLOPs its `pl.CostEstimate` declares (its body runs per grid step on blocks, so its
matmuls are not visible here); one without a cost estimate is opaque, counted as 0 and reported. A
shard_map body is traced per shard, so what it holds counts once per shard of its manual axes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
from jax.extend import core as jcore


@dataclass
class ProgramFlops:
    #: Global matmul FLOPs per call of the program, scan bodies multiplied by their length.
    flops: float
    #: The same with every loop body counted once (what XLA's cost analysis does).
    flops_loops_once: float
    #: Loops found: (kind, trip count or None for while loops with data-dependent trip counts).
    loops: list
    #: Pallas kernel calls without a declared cost estimate: their FLOPs are not counted.
    opaque_calls: int = 0
    #: Of `flops`, what Pallas kernels declare (global, scan trips included).
    declared_flops: float = 0.0


def _dot_flops(eqn) -> float:
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    rhs_free = [d for i, d in enumerate(rhs.shape) if i not in rc and i not in rb]
    return 2.0 * math.prod(lhs.shape) * math.prod(rhs_free)


def _conv_flops(eqn) -> float:
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    out = eqn.outvars[0].aval
    # 2 * output elements * (kernel elements per output feature); grouped convs are rare here.
    dn = eqn.params["dimension_numbers"]
    o_dim = dn.rhs_spec[0]
    per_out = math.prod(rhs.shape) / rhs.shape[o_dim]
    return 2.0 * math.prod(out.shape) * per_out


def _sub_jaxprs(params: dict):
    for v in params.values():
        if isinstance(v, jcore.ClosedJaxpr):
            yield v.jaxpr
        elif isinstance(v, jcore.Jaxpr):
            yield v
        elif isinstance(v, (tuple, list)):
            for x in v:
                if isinstance(x, jcore.ClosedJaxpr):
                    yield x.jaxpr
                elif isinstance(x, jcore.Jaxpr):
                    yield x


def _shards(params: dict) -> int:
    """How many shards a shard_map body runs as: the product of its manual mesh axes."""
    mesh, axes = params.get("mesh"), params.get("newly_manual_axes") or params.get("manual_axes") or ()
    shape = dict(getattr(mesh, "shape", {}) or {})
    return math.prod(shape.get(a, 1) for a in axes) if shape else 1


def _walk(jaxpr, trips: bool, loops: list | None, opaque: list | None = None, declared: list | None = None,
          mult: float = 1.0) -> float:
    """FLOPs of `jaxpr` (x mult); pallas calls append their count to `declared` (or `opaque` if none)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "pallas_call":
            cost = eqn.params.get("cost_estimate")
            if cost is None:
                if opaque is not None:
                    opaque.append(name)
            else:
                total += float(cost.flops)
                if declared is not None:
                    declared.append(float(cost.flops) * mult)
            continue
        if name == "shard_map":
            k = _shards(eqn.params)
            total += k * _walk(eqn.params["jaxpr"], trips, loops, opaque, declared, mult * k)
            continue
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "scan":
            n = int(eqn.params["length"])
            # A fully unrolled scan (unroll >= length, e.g. shallow models) compiles to straight-line
            # code, not a loop: the compiler counts every copy, so "loops once" must too.
            unrolled = int(eqn.params.get("unroll", 1)) >= n
            if loops is not None and not unrolled:
                loops.append(("scan", n))
            k = n if (trips or unrolled) else 1
            total += k * _walk(eqn.params["jaxpr"].jaxpr, trips, loops, opaque, declared, mult * k)
        elif name == "while":
            if loops is not None:
                loops.append(("while", None))
            total += _walk(eqn.params["body_jaxpr"].jaxpr, trips, loops, opaque, declared, mult)
        elif name == "cond":
            total += max(_walk(b.jaxpr, trips, loops) for b in eqn.params["branches"])
        else:
            # pjit, closed_call, remat (checkpoint), custom_jvp/vjp calls, shard_map: recurse once.
            for sub in _sub_jaxprs(eqn.params):
                total += _walk(sub, trips, loops, opaque, declared, mult)
    return total


def count(fn, *args) -> ProgramFlops:
    """Trace fn(*args) (ShapeDtypeStructs are fine: nothing runs) and count its matmul FLOPs."""
    closed = jax.make_jaxpr(fn)(*args)
    loops: list = []
    opaque: list = []
    declared: list = []
    full = _walk(closed.jaxpr, True, loops, opaque, declared)
    once = _walk(closed.jaxpr, False, None)
    # opaque counts static call sites (each scan body once), i.e. distinct kernel calls in the program.
    return ProgramFlops(full, once, loops, len(opaque), sum(declared))

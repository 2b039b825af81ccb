"""Read the compiled (per-device, post-partitioning) HLO text: loops, collectives, HBM traffic.

XLA's `cost_analysis()` counts each while-loop body once, and our step is two nested loops (gradient
accumulation over micro-batches, layers under scan). This module walks the optimised module's call
graph from the entry computation, multiplying each while body by its trip count (read from the
loop condition's compare constant), and totals:
- collective bytes per device by kind (all-gather, reduce-scatter, all-reduce, all-to-all,
  collective-permute), as the ring-algorithm traffic each device sends: (n-1)/n of the gathered /
  scattered size, 2(n-1)/n for all-reduce;
- HBM traffic per device: operand + result bytes of every top-level instruction of a control-flow
  computation (entry, loop bodies), excluding buffers the compiler placed in on-chip memory
  (layout `S(n)`, n != 0). Fusion internals stay on chip and are not counted.
Both are estimates from the compiled program's own shapes, labelled so in the report.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
    "s4": 0.5, "u4": 0.5, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
    "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_COMP_HEAD = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
_COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "opt-barrier", "iota"}


@dataclass
class HloStats:
    """Per-device figures of one compiled module (see module docstring)."""

    #: [(body computation, trip count)] for every while loop reached from the entry.
    loops: list = field(default_factory=list)
    #: kind -> bytes each device sends per step (loop trips included).
    collective_bytes: dict = field(default_factory=dict)
    #: HBM bytes read + written per step (loop trips included).
    hbm_traffic_bytes: float = 0.0
    #: The same walk with every loop body counted once (comparable with cost_analysis' "bytes accessed").
    hbm_traffic_bytes_loops_once: float = 0.0
    #: Largest HBM traffic contributors: [(JAX op name from the HLO metadata, bytes)], loop trips included.
    traffic_by_op: list = field(default_factory=list)

    @property
    def collective_total(self) -> float:
        return float(sum(self.collective_bytes.values()))


def _split_type(rest: str) -> tuple[str, str]:
    """'(f32[2]{0}, s32[]) tuple(...)' -> (type text, remainder)."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1:].lstrip()
    sp = rest.find(" ")
    return (rest, "") if sp < 0 else (rest[:sp], rest[sp + 1:])


def shape_bytes(type_text: str, hbm_only: bool = False) -> float:
    """Bytes of every array in an HLO type (tuples summed). hbm_only skips arrays with a non-zero memory space."""
    total = 0.0
    for dt, dims, layout in _ARRAY.findall(type_text):
        if dt not in _DTYPE_BYTES:
            continue
        if hbm_only and layout and re.search(r"S\((\d+)\)", layout) and re.search(r"S\((\d+)\)", layout).group(1) != "0":
            continue
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += n * _DTYPE_BYTES[dt]
    return total


@dataclass
class _Instr:
    name: str
    type_text: str
    opcode: str
    operands: list
    attrs: str


def parse_module(text: str) -> tuple[dict[str, list[_Instr]], str]:
    comps: dict[str, list[_Instr]] = {}
    entry, cur = "", None
    for line in text.splitlines():
        if not line.startswith(" "):
            m = _COMP_HEAD.match(line)
            if m and not line.startswith("HloModule"):
                cur = m.group(2)
                comps[cur] = []
                if m.group(1):
                    entry = cur
            continue
        m = _INSTR.match(line)
        if not m or cur is None:
            continue
        type_text, rest = _split_type(m.group(2))
        op_m = re.match(r"([\w\-]+)\((.*)", rest)
        if not op_m:
            continue
        opcode, tail = op_m.group(1), op_m.group(2)
        depth, end = 1, len(tail)
        for i, ch in enumerate(tail):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                end = i
                break
        operands = re.findall(r"%([\w.\-]+)", tail[:end])
        comps[cur].append(_Instr(m.group(1), type_text, opcode, operands, tail[end + 1:]))
    return comps, entry


def _group_size(attrs: str, default: int) -> int:
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", attrs)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([0-9,]+)\}", attrs)
    if m:
        return len(m.group(1).split(","))
    return default


def analyse(text: str, n_devices: int) -> HloStats:
    comps, entry = parse_module(text)
    raw_lines = _constants_by_comp(text)
    fused = _fusion_bodies(comps)
    stats = HloStats()
    coll: dict[str, float] = defaultdict(float)
    traffic = [0.0, 0.0]
    by_op: dict[str, float] = defaultdict(float)

    def walk(name: str, mult: float, mult_once: float, stack: tuple = ()):
        if name not in comps or name in stack:
            return
        shapes = {i.name: i.type_text for i in comps[name]}
        control = name not in fused
        for ins in comps[name]:
            base = ins.opcode.replace("-start", "").replace("-done", "")
            if base in _COLLECTIVES and not ins.opcode.endswith("-done"):
                coll[base] += _collective_bytes(ins, base, shapes, n_devices) * mult
            if control and ins.opcode not in _NO_TRAFFIC and base not in _COLLECTIVES:
                t = shape_bytes(ins.type_text, hbm_only=True) + sum(
                    shape_bytes(shapes.get(o, ""), hbm_only=True) for o in ins.operands)
                traffic[0] += t * mult
                traffic[1] += t * mult_once
                by_op[_op_name(ins.attrs)] += t * mult
            if ins.opcode == "while":
                body = re.search(r"body=%?([\w.\-]+)", ins.attrs)
                cond = re.search(r"condition=%?([\w.\-]+)", ins.attrs)
                trip = _loop_trip(raw_lines.get(cond.group(1), []) if cond else [])
                stats.loops.append((body.group(1) if body else "?", trip))
                k = trip or 1
                if cond:
                    walk(cond.group(1), mult * k, mult_once, stack + (name,))
                if body:
                    walk(body.group(1), mult * k, mult_once, stack + (name,))
                continue
            for callee in _callees(ins, name):
                walk(callee, mult, mult_once, stack + (name,))

    walk(entry, 1.0, 1.0)
    stats.collective_bytes = dict(coll)
    stats.hbm_traffic_bytes, stats.hbm_traffic_bytes_loops_once = traffic
    stats.traffic_by_op = sorted(by_op.items(), key=lambda kv: -kv[1])[:8]
    return stats


def _fusion_bodies(comps: dict[str, list[_Instr]]) -> set[str]:
    """Computations called by a fusion: their instructions run on chip, so they move no HBM bytes."""
    fused: set[str] = set()
    for instrs in comps.values():
        for ins in instrs:
            if ins.opcode == "fusion":
                fused.update(re.findall(r"calls=%?([\w.\-]+)", ins.attrs))
    return fused


def _collective_bytes(ins: _Instr, base: str, shapes: dict[str, str], n_devices: int) -> float:
    """Bytes one device sends for one collective, ring algorithm (see the module docstring)."""
    n = _group_size(ins.attrs, n_devices)
    frac = (n - 1) / n if n > 1 else 0.0
    out_b = shape_bytes(ins.type_text)
    in_b = sum(shape_bytes(shapes.get(o, "")) for o in ins.operands)
    if ins.opcode.endswith("-start"):
        out_b = max(out_b - in_b, 0.0)  # async start returns (operands..., results..., scratch)
    if base == "reduce-scatter":
        return in_b * frac
    if base == "all-reduce":
        return 2 * out_b * frac
    if base == "collective-permute":
        return out_b
    return out_b * frac  # all-gather: the gathered result; all-to-all: same size in and out


def _callees(ins: _Instr, name: str) -> list[str]:
    """Computations a non-loop instruction runs, in walk order. A fusion's body is included: collectives can
    sit inside fusions (TPU async collective fusions) and are counted there, with no traffic."""
    out = [c for c in re.findall(r"(?:calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)", ins.attrs)
           if c != name and ins.opcode != "fusion"]
    for group in re.findall(r"branch_computations=\{([^}]*)\}", ins.attrs):
        out += re.findall(r"%?([\w.\-]+)", group)
    if ins.opcode == "fusion":
        out += re.findall(r"calls=%?([\w.\-]+)", ins.attrs)
    return out


def _op_name(attrs: str) -> str:
    """The JAX-level op an HLO instruction came from, without jit/transpose wrappers: 'while/body/...'"""
    m = re.search(r'op_name="([^"]*)"', attrs)
    if not m:
        return "(no metadata)"
    parts = [p for p in m.group(1).split("/") if not p.startswith(("jit(", "jvp(", "transpose(")) and p not in ("while", "body", "closed_call", "checkpoint", "rematted_computation")]
    return "/".join(parts[-2:]) if parts else m.group(1)


def _constants_by_comp(text: str) -> dict[str, list[str]]:
    """computation -> its instruction lines (for reading loop bounds)."""
    out: dict[str, list[str]] = {}
    cur = None
    for line in text.splitlines():
        if not line.startswith(" "):
            m = _COMP_HEAD.match(line)
            cur = m.group(2) if m and not line.startswith("HloModule") else None
            if cur:
                out[cur] = []
            continue
        if cur:
            out[cur].append(line)
    return out


def _loop_trip(cond_lines: list[str]) -> int | None:
    """Trip count of a counted loop: the integer constant its condition compares the counter with.

    JAX's scan / fori_loop lower to `i < N` with i starting at 0, so N is the trip count."""
    vals = [int(v) for line in cond_lines for v in re.findall(r"[su](?:32|64)\[\]\S* constant\((\d+)\)", line)]
    return max(vals) if vals else None

"""The compile front end of the estimator: the optimised per-device HLO text as a list of `Op`s.

One parser for compiled modules (`compile.hlo` reads its totals from here). The walk starts at the entry
computation and multiplies each while body by its trip count (the compiler's `known_trip_count`, else
the integer its condition compares the counter with: JAX's scan / fori_loop lower to `i < N`).

Per top-level instruction of a control-flow computation (entry, loop bodies, called computations):
- a fusion or plain instruction is one compute Op: flops = the dots / convolutions in it (2 x output
  elements x contracted size), bytes = operand + result bytes in HBM (buffers the compiler placed in
  on-chip memory, layout `S(n)` with n != 0, move nothing). Fusion internals stay on chip.
- In-place dynamic-update-slice (alone or as a fusion's root) reads and writes the update, not the
  buffer it updates; a fusion parameter read only through (dynamic-)slices or gathers costs what those
  return. The scanned layer loop updates / reads one layer of stacked `[L, ...]` buffers per trip:
  charging the whole stack there overcounted HBM traffic by 26-72% on llama3-8b (issue 14).
- A custom call with a declared cost (Pallas/Mosaic TPU kernels carry their `pl.CostEstimate` in
  backend_config: custom_call_config.cost_estimate, int64s as JSON strings) costs what it declares,
  source "declared". Without one, an attention kernel (MaxText's splash attention, Pallas flash
  attention) has its FLOPs inferred from q / k shapes (estimate.kernels), source "inferred"; any other
  (Triton: jax drops cost_estimate when lowering) is an "opaque" op with its operand + result bytes and
  no flops, listed by `opaque_ops`, never dropped.
- An async copy / slice (TPU DMA) moves its data once; one to or from host memory (S(5)) is also a HOST
  op (collective "host-out" to the host, "host-in" back) of the bytes moved, as is a dynamic-update-slice into a host buffer
  (the update) or a (dynamic-)slice / copy out of one (the result): XLA:TPU's remat offload wraps those
  in async computations, walked like calls.
- A collective is a collective Op: the bytes one device sends under the ring algorithm ((n-1)/n of the
  gathered / scattered size, 2(n-1)/n for all-reduce, the payload for collective-permute, (n-1)/n of the
  smaller of operand and output for ragged-all-to-all, whose buffers are sized for the worst case), link INTER
  when one of its groups holds devices of more than one slice (device ids are global and slices are
  contiguous blocks of `devices_per_slice` ids), else INTRA.
- A cross-slice collective of a multi-slice TPU program is not an HLO collective: XLA:TPU lowers it to
  host-transfer send / recv pairs for the DCN ("megascale") runtime, tagged with the collective's kind
  (`_xla_megascale_transfer_type`: ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER, ALL_TO_ALL, ONE_TO_ONE for a
  collective-permute) and its slices (`_xla_megascale_target`, e.g. `{1,2}x{0:3}`: slices 1 and 2). Each
  send is one INTER collective Op: its payload is this device's part, so the ring bytes are
  (n-1)/n x 2 x payload for an all-reduce, (n-1) x payload for an all-gather (the payload is one of n
  parts), (n-1)/n x payload for reduce-scatter and all-to-all, the payload for one-to-one; n = the
  slices named, else all of them. The recv and the -done halves move nothing more.
"""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from polychip.estimate.kernels import attention_flops
from polychip.estimate.ops import HOST, INTER, INTRA, Op

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
    "s4": 0.5, "u4": 0.5, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
    "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_COMP_HEAD = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT )?%?([\w.\-]+) = (.*)$")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute",
               "ragged-all-to-all")
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id", "opt-barrier", "iota", "async-start", "async-update",
               "async-done", "add-dependency", "domain", "call-start", "call-update", "call-done"}

_HOST_SPACE = re.compile(r"S\(5\)")
#: Ops that read only the part of their first operand they return.
_SLICING = ("dynamic-slice", "slice", "gather")
#: Custom calls that mark, allocate or annotate and move no data of their own.
#: ConcatBitcast joins buffers the compiler already placed side by side (a bitcast, no copy).
_BOOKKEEPING_CALLS = {"AllocateBuffer", "AsyncCollectiveStart", "AsyncCollectiveDone", "AssumeGatherIndicesInBound",
                      "Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape", "LayoutConstraint", "ConcatBitcast",
                      "PrepareAsyncCallStart", "PrepareAsyncCallDone"}


def _channel(ins: "Instr") -> str | None:
    m = re.search(r"channel_id=(\d+)", ins.attrs)
    return m.group(1) if m else None


@dataclass
class Instr:
    """One HLO instruction: `name = type_text opcode(args) attrs`; operands are the %names in args."""

    name: str
    type_text: str
    opcode: str
    operands: list
    args: str
    attrs: str
    root: bool = False


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
        space = re.search(r"S\((\d+)\)", layout) if layout else None
        if hbm_only and space and space.group(1) != "0":
            continue
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += n * _DTYPE_BYTES[dt]
    return total


def tuple_elements(type_text: str) -> list[str]:
    """'(a, (b, c), d)' -> ['a', '(b, c)', 'd']; a non-tuple type -> [itself]."""
    t = re.sub(r"/\*[^*]*\*/", "", type_text.strip())
    if not t.startswith("("):
        return [t]
    out, depth, cur = [], 0, ""
    for ch in t[1:-1]:
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        depth += ch in "({["
        depth -= ch in ")}]"
        cur += ch
    return out + ([cur.strip()] if cur.strip() else [])


def _dims(type_text: str) -> list[int]:
    m = _ARRAY.search(type_text)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def parse_module(text: str) -> tuple[dict[str, list[Instr]], str]:
    """computation name -> its instructions, and the entry computation's name."""
    comps: dict[str, list[Instr]] = {}
    entry, cur = "", ""
    for head, line in _instructions(text.splitlines()):
        if head is not None:
            m = _COMP_HEAD.match(head)
            cur = m.group(2)
            comps[cur] = []
            entry = cur if m.group(1) else entry
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        type_text, rest = _split_type(m.group(3))
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
        comps[cur].append(Instr(m.group(2), type_text, opcode, re.findall(r"%([\w.\-]+)", tail[:end]),
                                tail[:end], tail[end + 1:], bool(m.group(1))))
    return comps, entry


def _unclosed(text: str) -> bool:
    """True while brackets opened in `text` (outside double-quoted strings) are not all closed."""
    depth, in_str, esc = 0, False, False
    for ch in text:
        if esc:
            esc = False
        elif in_str:
            esc, in_str = ch == "\\", ch != '"'
        elif ch == '"':
            in_str = True
        elif ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
    return depth > 0


def _instructions(lines: list[str]):
    """Yield (computation head line, "") at each computation and (None, instruction text) per instruction.

    An instruction may span lines: MaxText's splash-attention custom calls carry JSON with literal newlines
    (and a blank line) in their attributes. Inside a computation, a line that does not start a new
    instruction continues the previous one, and a line starting with `}` (alone, or followed by attributes
    such as `}, execution_thread="sparsecore"`) ends the computation only once the instruction before it
    has closed its brackets. Lines outside computations (FileNames, StackFrames) are skipped."""
    pending: list[str] = []
    in_comp = False
    for line in lines:
        if in_comp:
            if line.startswith(" ") and _INSTR.match(line):
                if pending:
                    yield None, " ".join(pending)
                pending = [line]
            elif not line.startswith("}") or (pending and _unclosed(" ".join(pending))):
                pending.append(line)
            else:
                if pending:
                    yield None, " ".join(pending)
                pending, in_comp = [], False
        elif _COMP_HEAD.match(line) and not line.startswith("HloModule"):
            in_comp = True
            yield line, ""
    if pending:
        yield None, " ".join(pending)


# ---- loops -------------------------------------------------------------------------------------------

def loop_trip(ins: Instr, comps: dict[str, list[Instr]]) -> int | None:
    """A while loop's trip count: the compiler's annotation, else the largest integer scalar constant its
    condition (or a fusion it calls) compares with."""
    m = re.search(r'"known_trip_count":\{"n":"?(\d+)', ins.attrs)
    if m:
        return int(m.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", ins.attrs)
    vals: list[int] = []
    todo, seen = [cond.group(1)] if cond else [], set()
    while todo:
        c = todo.pop()
        if c in seen or c not in comps:
            continue
        seen.add(c)
        for i in comps[c]:
            if i.opcode == "constant" and re.match(r"[su](?:32|64)\[\]", i.type_text) and i.args.strip().isdigit():
                vals.append(int(i.args))
            todo += re.findall(r"calls=%?([\w.\-]+)", i.attrs)
    return max(vals) if vals else None


def _callees(ins: Instr) -> list[str]:
    """Control-flow computations a non-loop, non-fusion instruction runs: a call's body, an async wrapper's
    computation, a conditional's branches (all of them: an overcount where branches differ). A reduce's
    or scatter's `to_apply` is its scalar combiner, run inside the op, and is not walked."""
    if ins.opcode in ("call", "call-start"):  # call-start: an async call (TPU7x runs collectives on SparseCore)
        return re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", ins.attrs)
    if ins.opcode == "async-start":
        return re.findall(r"calls=%?([\w.\-]+)", ins.attrs)
    if ins.opcode != "conditional":
        return []
    out = re.findall(r"(?:true_computation|false_computation)=%?([\w.\-]+)", ins.attrs)
    for group in re.findall(r"branch_computations=\{([^}]*)\}", ins.attrs):
        out += re.findall(r"%?([\w.\-]+)", group)
    return out


# ---- replica groups and links ------------------------------------------------------------------------

def replica_groups(attrs: str, n_devices: int) -> list[list[int]]:
    """The device groups of a collective: explicit `{{0,1},{2,3}}`, iota `[G,S]<=[dims]T(perm)`, or
    collective-permute's `source_target_pairs`; `{}` (or none) means one group of every device."""
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", attrs)
    if m:
        g, s = int(m.group(1)), int(m.group(2))
        dims = [int(d) for d in m.group(3).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(4):
            ids = ids.transpose([int(p) for p in m.group(4).split(",")])
        return ids.reshape(g, s).tolist()
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?)? \{([^}]*)\}", attrs)
    if m:
        return _mesh_groups(m.group(1), m.group(2), m.group(3), m.group(4))
    m = re.search(r"(?:replica_groups|source_target_pairs)=\{((?:\{[0-9,]*\},?)*)\}", attrs)
    if m and m.group(1):
        return [[int(x) for x in grp.split(",") if x] for grp in re.findall(r"\{([0-9,]*)\}", m.group(1))]
    return [list(range(n_devices))]


def _mesh_groups(axes: str, dev_dims: str | None, perm: str | None, over: str) -> list[list[int]]:
    """`mesh['a'=2,'b'=4] {'b'}`: devices are the (row-major, optionally permuted) iota over the mesh
    axes, and each group varies along the named axes: here {{0,1,2,3},{4,5,6,7}}; {'a'} gives {0,4},..."""
    names = re.findall(r"'([^']+)'=\d+", axes)
    sizes = [int(v) for v in re.findall(r"'[^']+'=(\d+)", axes)]
    ids = np.arange(math.prod(sizes))
    if dev_dims:
        ids = ids.reshape([int(d) for d in dev_dims.split(",")])
        if perm:
            ids = ids.transpose([int(p) for p in perm.split(",")])
    ids = ids.reshape(sizes)
    inner = [names.index(a) for a in re.findall(r"'([^']+)'", over) if a in names]
    outer = [i for i in range(len(names)) if i not in inner]
    size = math.prod(sizes[i] for i in inner)
    return ids.transpose(outer + inner).reshape(-1, size).tolist()


def link_of(groups: list[list[int]], devices_per_slice: int | None) -> str:
    """INTER when some group spans more than one slice, else INTRA."""
    if not devices_per_slice:
        return INTRA
    return INTER if any(len({d // devices_per_slice for d in g}) > 1 for g in groups) else INTRA


def collective_bytes(ins: Instr, base: str, shapes: dict[str, str], group_size: int) -> float:
    """Bytes one device sends for one collective, ring algorithm (see the module docstring)."""
    frac = (group_size - 1) / group_size if group_size > 1 else 0.0
    out_b = shape_bytes(ins.type_text)
    in_b = sum(shape_bytes(shapes.get(o, "")) for o in ins.operands)
    if ins.opcode.endswith("-start") and ins.type_text.startswith("("):
        out_b = max(out_b - in_b, 0.0)  # async start returns (operands..., results..., scratch)
    if base == "reduce-scatter":
        return in_b * frac
    if base == "all-reduce":
        return 2 * out_b * frac
    if base == "collective-permute":
        return out_b
    if base == "ragged-all-to-all":
        # What moves is data-dependent: at most the smaller of the rows offered (the operand) and the room to
        # receive them (the output), either of which may be a buffer sized for the worst case; (n-1)/n of
        # that goes to other devices when the rows spread evenly (balanced routing).
        if len(ins.operands) < 2:
            return 0.0
        return min(shape_bytes(shapes.get(ins.operands[0], "")), shape_bytes(shapes.get(ins.operands[1], ""))) * frac
    return out_b * frac  # all-gather: the gathered result; all-to-all: same size in and out


# ---- compute ops -------------------------------------------------------------------------------------

def dot_flops(ins: Instr, shapes: dict[str, str]) -> float:
    """2 x output elements x contracted size (dot), or x input features x kernel taps on input (convolution)."""
    out = math.prod(_dims(ins.type_text))
    if ins.opcode == "dot":
        lhs = _dims(shapes.get(ins.operands[0], "")) if ins.operands else []
        m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
        k = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d) if m and lhs else 1
        return 2.0 * out * k
    return 2.0 * out * _conv_macs_per_output(ins, shapes)


def _conv_macs_per_output(ins: Instr, shapes: dict[str, str]) -> float:
    """Input features x the kernel taps that land on input (not on padding), averaged over output positions.

    XLA:TPU writes some per-head matmuls as a convolution whose window spans a padded size-1 dimension
    (`window={size=1x32 pad=0_0x31_31 rhs_reversal=0x1}`): one tap of 32 meets data. Counting the whole
    window made the Q/K/V projections of MaxText's v6e-256 Llama3.1-8B recipe 32x their work."""
    lhs = _dims(shapes.get(ins.operands[0], "")) if ins.operands else []
    rhs = _dims(shapes.get(ins.operands[1], "")) if len(ins.operands) > 1 else []
    out = _dims(ins.type_text)
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
    if not lhs or not rhs or not out or not labels or "i" not in labels.group(2):
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    win = re.search(r"window=\{([^}]*)\}", ins.attrs)
    spec = dict(kv.split("=", 1) for kv in win.group(1).split() if "=" in kv) if win else {}
    n_sp = sum(c.isdigit() for c in rhs_l)

    def per_dim(key: str, default: str) -> list:
        vals = spec[key].split("x") if key in spec else [default] * n_sp
        return [tuple(int(x) for x in v.split("_")) if "_" in v else int(v) for v in vals]
    size, stride, pad = per_dim("size", "1"), per_dim("stride", "1"), per_dim("pad", "0_0")
    ldil, rdil = per_dim("lhs_dilate", "1"), per_dim("rhs_dilate", "1")
    macs = float(rhs[rhs_l.index("i")])
    for d in range(n_sp):
        n_in, n_out, k = lhs[lhs_l.index(str(d))], out[out_l.index(str(d))], size[d]
        macs *= _valid_taps(n_in, n_out, k, stride[d], pad[d][0], ldil[d], rdil[d]) / n_out
    return macs


def _valid_taps(n_in: int, n_out: int, k: int, stride: int, pad_lo: int, ldil: int, rdil: int) -> int:
    """(output position, kernel tap) pairs of one spatial dimension that read input rather than padding.
    Output o, tap t reads position o*stride + t*rdil - pad_lo of the lhs_dilate-dilated input: data where it
    is a multiple of ldil in [0, (n_in-1)*ldil]. Counted per tap in closed form (ldil 1) or enumerated."""
    hi_pos = (n_in - 1) * ldil
    total = 0
    for t in range(k):
        off = t * rdil - pad_lo  # position = o*stride + off
        if ldil == 1:
            lo_o = max(0, -(off // stride))  # ceil(-off / stride) in integers
            hi_o = min(n_out - 1, (hi_pos - off) // stride)
            total += max(0, hi_o - lo_o + 1)
        else:
            pos = np.arange(n_out) * stride + off
            total += int(((pos >= 0) & (pos <= hi_pos) & (pos % ldil == 0)).sum())
    return total


def cost_estimate(attrs: str) -> dict | None:
    """A custom call's declared cost ({"flops", "bytes_accessed", ...}) from its backend_config, or None."""
    m = re.search(r'"cost_estimate":\s*\{([^}]*)\}', attrs)
    if not m:
        return None
    try:
        return {k: float(v) for k, v in json.loads("{" + m.group(1) + "}").items()}
    except (ValueError, TypeError):
        return None


class _Walker:
    """Walks a parsed module from its entry and appends Ops (see the module docstring)."""

    def __init__(self, comps: dict[str, list[Instr]], n_devices: int, devices_per_slice: int | None,
                 loop_trips: bool = True, attention_causal: bool = False):
        self.comps, self.n, self.dps, self.loop_trips = comps, n_devices, devices_per_slice, loop_trips
        self.causal = attention_causal
        self.shapes = {c: {i.name: i.type_text for i in instrs} for c, instrs in comps.items()}
        self.ops: list[Op] = []
        self.loops: list[tuple[str, int | None]] = []
        # TPU splits an async collective into a start fusion (root: custom call AsyncCollectiveStart), fusions
        # that carry it on beside compute, and a done fusion, each holding a clone of the collective with the
        # same channel_id: it is counted once, at its start.
        self.start_comps = {c for c, instrs in comps.items()
                            if any(i.root and 'custom_call_target="AsyncCollectiveStart"' in i.attrs for i in instrs)}
        self.started = {_channel(i) for c in self.start_comps for i in comps[c]
                        if i.opcode.removesuffix("-start") in COLLECTIVES}

    def walk(self, comp: str, mult: float, stack: tuple = ()) -> None:
        if comp not in self.comps or comp in stack:
            return
        stack = stack + (comp,)
        shapes = self.shapes[comp]
        for ins in self.comps[comp]:
            base = ins.opcode.removesuffix("-start").removesuffix("-done")
            if base in COLLECTIVES:
                if not ins.opcode.endswith("-done"):
                    self._collective(ins, base, shapes, mult)
            elif ins.opcode == "while":
                body = re.search(r"body=%?([\w.\-]+)", ins.attrs)
                trip = loop_trip(ins, self.comps)
                self.loops.append((body.group(1) if body else "?", trip))
                k = (trip or 1) if self.loop_trips else 1
                cond = re.search(r"condition=%?([\w.\-]+)", ins.attrs)
                for c in (cond, body):
                    if c:
                        self.walk(c.group(1), mult * k, stack)
            elif ins.opcode in ("send", "recv", "send-done", "recv-done") and "_xla_megascale" in ins.attrs:
                if ins.opcode == "send":
                    self._dcn_transfer(ins, mult)
            elif ins.opcode == "fusion":
                self._fusion(ins, shapes, mult, stack)
            elif ins.opcode == "custom-call":
                self._custom_call(ins, shapes, mult)
            elif ins.opcode in ("slice-start", "copy-start"):
                self._compute(ins, 0.0, self._async_bytes(ins, shapes), mult)
                self._host_transfer(ins, shapes, mult)
            else:
                if ins.opcode not in _NO_TRAFFIC and not ins.opcode.endswith("-done"):
                    self._compute(ins, dot_flops(ins, shapes) if ins.opcode in ("dot", "convolution") else 0.0,
                                  self._plain_bytes(ins, shapes), mult)
                    self._host_plain(ins, shapes, mult)
                for callee in _callees(ins):
                    self.walk(callee, mult, stack)

    def _add(self, ins: Instr, mult: float, **kw) -> None:
        self.ops.append(Op(name=op_label(ins), count=mult, **kw))

    def _compute(self, ins: Instr, flops: float, nbytes: float, mult: float, source: str = "hlo") -> None:
        self._add(ins, mult, kind="compute", flops=flops, bytes=nbytes, source=source)

    def _collective(self, ins: Instr, base: str, shapes: dict, mult: float) -> None:
        groups = replica_groups(ins.attrs, self.n)
        size = 2 if base == "collective-permute" else max(len(g) for g in groups)
        self._add(ins, mult, kind="collective", bytes=collective_bytes(ins, base, shapes, size),
                  link=link_of(groups, self.dps), collective=base)

    def _dcn_transfer(self, ins: Instr, mult: float) -> None:
        """A megascale send: one cross-slice collective (see the module docstring)."""
        kind = re.search(r'_xla_megascale_transfer_type="?(\w+)', ins.attrs)
        kind = kind.group(1) if kind else "ONE_TO_ONE"
        parts = tuple_elements(ins.type_text)
        payload = shape_bytes(parts[0] if parts else ins.type_text)
        named = re.search(r'_xla_megascale_target="\{([0-9,]*)\}x', ins.attrs)
        n = len([s for s in named.group(1).split(",") if s]) if named else \
            (self.n // self.dps if self.dps else 1)
        frac = (n - 1) / n if n > 1 else 0.0
        base, nbytes = {"ALL_REDUCE": ("all-reduce", 2 * frac * payload),
                        "ALL_GATHER": ("all-gather", (n - 1) * payload),
                        "REDUCE_SCATTER": ("reduce-scatter", frac * payload),
                        "ALL_TO_ALL": ("all-to-all", frac * payload)}.get(kind, ("collective-permute", payload))
        self._add(ins, mult, kind="collective", bytes=nbytes, link=INTER, collective=base)

    def _custom_call(self, ins: Instr, shapes: dict, mult: float) -> None:
        target = re.search(r'custom_call_target="([^"]*)"', ins.attrs)
        if target and target.group(1) in _BOOKKEEPING_CALLS:
            return
        cost = cost_estimate(ins.attrs)
        if cost is not None:
            self._compute(ins, cost.get("flops", 0.0), cost.get("bytes_accessed", 0.0), mult, "declared")
            return
        flops = attention_flops(ins.name, ins.attrs, [shapes.get(o, "") for o in ins.operands],
                                tuple_elements(ins.type_text), self.causal)
        if flops is not None:
            self._compute(ins, flops, self._plain_bytes(ins, shapes), mult, "inferred")
            return
        name = op_label(ins) + ("" if "op_name=" in ins.attrs or not target else f" ({target.group(1)})")
        self.ops.append(Op(name=name, count=mult, bytes=self._plain_bytes(ins, shapes), source="opaque"))

    def _async_bytes(self, ins: Instr, shapes: dict) -> float:
        """An async copy / slice (TPU DMA) moves its data once, counted at the start: the source read where it
        lies in HBM and the destination written where it lies in HBM. slice-start returns ((source), slice,
        context), copy-start (destination, source, context); the done half moves nothing more."""
        src = shapes.get(ins.operands[0], "") if ins.operands else ""
        parts = tuple_elements(ins.type_text)
        dest = parts[1] if ins.opcode == "slice-start" and len(parts) > 1 else parts[0] if parts else ""
        moved = shape_bytes(dest)
        return (moved if shape_bytes(src, hbm_only=True) else 0.0) + shape_bytes(dest, hbm_only=True)

    def _host_transfer(self, ins: Instr, shapes: dict, mult: float) -> None:
        """A DMA to or from host memory (memory space S(5), where XLA puts offloaded activations) also
        crosses the host link: a HOST op of the bytes moved, "host-out" to the host, "host-in" back."""
        src = shapes.get(ins.operands[0], "") if ins.operands else ""
        parts = tuple_elements(ins.type_text)
        dest = parts[1] if ins.opcode == "slice-start" and len(parts) > 1 else parts[0] if parts else ""
        if _HOST_SPACE.search(src) or _HOST_SPACE.search(dest):
            self._add(ins, mult, kind="collective", bytes=shape_bytes(dest), link=HOST,
                      collective="host-in" if _HOST_SPACE.search(src) else "host-out")

    def _plain_bytes(self, ins: Instr, shapes: dict) -> float:
        """HBM bytes of an unfused instruction; an in-place dynamic-update-slice reads the update and writes
        it into the buffer, a (dynamic-)slice or gather reads and writes its result (plus its indices); a
        side in host memory (S(5)) moves no HBM bytes."""
        ops_b = [shape_bytes(shapes.get(o, ""), hbm_only=True) for o in ins.operands]
        if ins.opcode == "dynamic-update-slice" and len(ops_b) >= 2:
            in_hbm = bool(shape_bytes(ins.type_text, hbm_only=True))
            return ops_b[1] + (shape_bytes(shapes.get(ins.operands[1], "")) if in_hbm else 0.0) + sum(ops_b[2:])
        if ins.opcode in _SLICING:
            src_hbm = bool(ops_b and ops_b[0])
            return shape_bytes(ins.type_text, hbm_only=True) + (shape_bytes(ins.type_text) if src_hbm else 0.0) \
                + sum(ops_b[1:])
        return shape_bytes(ins.type_text, hbm_only=True) + sum(ops_b)

    def _host_plain(self, ins: Instr, shapes: dict, mult: float) -> None:
        """Host offload as XLA:TPU writes it inside async computations: a dynamic-update-slice into a host
        (S(5)) buffer sends the update over the host link, a (dynamic-)slice or copy of a host buffer brings
        its result back: a HOST op of those bytes."""
        src = shapes.get(ins.operands[0], "") if ins.operands else ""
        if ins.opcode == "dynamic-update-slice" and _HOST_SPACE.search(ins.type_text) and len(ins.operands) > 1:
            nbytes, way = shape_bytes(shapes.get(ins.operands[1], "")), "host-out"
        elif ins.opcode in _SLICING + ("copy",) and (_HOST_SPACE.search(src) or _HOST_SPACE.search(ins.type_text)):
            nbytes, way = shape_bytes(ins.type_text), "host-in" if _HOST_SPACE.search(src) else "host-out"
        else:
            return
        self._add(ins, mult, kind="collective", bytes=nbytes, link=HOST, collective=way)

    def _fusion(self, ins: Instr, shapes: dict, mult: float, stack: tuple) -> None:
        body = re.search(r"calls=%?([\w.\-]+)", ins.attrs)
        body = body.group(1) if body else ""
        flops, has_coll = self._fused_content(body, mult, stack)
        if has_coll and not flops:
            return  # an async collective fusion: its buffers are the collective's, costed on the link
        self._compute(ins, flops, fusion_bytes(ins, shapes, self.comps.get(body, [])), mult)

    def _fused_content(self, comp: str, mult: float, stack: tuple) -> tuple[float, bool]:
        """Dot / convolution FLOPs inside a fused computation (nested ones included); its collectives
        become collective Ops."""
        flops, has_coll = 0.0, False
        if comp not in self.comps or comp in stack:
            return flops, has_coll
        shapes = self.shapes[comp]
        for i in self.comps[comp]:
            base = i.opcode.removesuffix("-start").removesuffix("-done")
            if base in COLLECTIVES:
                has_coll = True
                if not i.opcode.endswith("-done") and (comp in self.start_comps or _channel(i) not in self.started):
                    self._collective(i, base, shapes, mult)
            elif i.opcode in ("dot", "convolution"):
                flops += dot_flops(i, shapes)
            for c in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", i.attrs):
                f, h = self._fused_content(c, mult, stack + (comp,))
                flops, has_coll = flops + f, has_coll or h
        return flops, has_coll


def fusion_bytes(ins: Instr, shapes: dict[str, str], body: list[Instr]) -> float:
    """Operand + result HBM bytes of a fusion, with in-place dynamic-update-slice roots charged for the
    update and parameters read only through (dynamic-)slices or gathers charged for what those return."""
    operands = [shape_bytes(shapes.get(o, ""), hbm_only=True) for o in ins.operands]
    result = shape_bytes(ins.type_text, hbm_only=True)
    if not body:
        return result + sum(operands)
    by_name = {i.name: i for i in body}
    param_index = {i.name: int(i.args) for i in body if i.opcode == "parameter" and i.args.strip().isdigit()}

    def through_bitcasts(name: str) -> str:
        while name in by_name and by_name[name].opcode in ("bitcast", "copy") and by_name[name].operands:
            name = by_name[name].operands[0]
        return name

    root = next((i for i in body if i.root), body[-1])
    outs = [by_name.get(o) for o in root.operands] if root.opcode == "tuple" else [root]
    for o in outs:
        if o is None or o.opcode != "dynamic-update-slice" or len(o.operands) < 2:
            continue
        buf, upd = through_bitcasts(o.operands[0]), shape_bytes(by_name[o.operands[1]].type_text) \
            if o.operands[1] in by_name else 0.0
        if buf in param_index and param_index[buf] < len(operands):
            # In place: the buffer is neither read nor rewritten; the update is written.
            operands[param_index[buf]] = 0.0
            result += upd - shape_bytes(o.type_text)
    users: dict[str, list[Instr]] = defaultdict(list)
    for i in body:
        for o in i.operands:
            users[o].append(i)
    for p, idx in param_index.items():
        readers = _readers(p, users)
        if readers and idx < len(operands) and all(r.opcode in _SLICING and r.operands[0] == via
                                                   for r, via in readers):
            operands[idx] = min(operands[idx], sum(shape_bytes(r.type_text) for r, _ in readers))
    return max(result, 0.0) + sum(operands)


def _readers(name: str, users: dict[str, list[Instr]]) -> list[tuple[Instr, str]]:
    """(instruction, the name it reads) for every reader of `name`, looking through bitcasts."""
    out = []
    for u in users.get(name, []):
        out += _readers(u.name, users) if u.opcode == "bitcast" else [(u, name)]
    return out


def op_label(ins: Instr) -> str:
    """`hlo name (jax op)`: the instruction, and the JAX op it came from without jit/transpose wrappers."""
    m = re.search(r'op_name="([^"]*)"', ins.attrs)
    if not m:
        return ins.name
    skip = ("while", "body", "closed_call", "checkpoint", "rematted_computation")
    parts = [p for p in m.group(1).split("/") if not p.startswith(("jit(", "jvp(", "transpose(")) and p not in skip]
    return f"{ins.name} ({'/'.join(parts[-2:]) if parts else m.group(1)})"


def ops_from_hlo(text: str, n_devices: int, devices_per_slice: int | None = None,
                 attention_causal: bool = False) -> list[Op]:
    """The per-device Ops of one compiled module (optimised HLO text), loop trip counts in `count`.

    n_devices: devices the module runs on (a collective without replica groups spans them all);
    devices_per_slice: devices per slice / node, to tell INTER links from INTRA (None: one slice);
    attention_causal: the model's attention is causal, for attention kernels whose FLOPs are inferred
    (estimate.kernels; the HLO elides their mask)."""
    return walk_module(text, n_devices, devices_per_slice, attention_causal=attention_causal)[0]


def opaque_ops(ops: list[Op]) -> list[Op]:
    """Custom calls with no declared cost: their time is only their HBM bytes (a lower bound)."""
    return [o for o in ops if o.source == "opaque"]


def walk_module(text: str, n_devices: int, devices_per_slice: int | None = None,
                loop_trips: bool = True, attention_causal: bool = False) -> tuple[list[Op], list]:
    """ops_from_hlo, plus the loops found [(body, trip count)]; loop_trips=False counts each body once."""
    comps, entry = parse_module(text)
    w = _Walker(comps, n_devices, devices_per_slice, loop_trips, attention_causal)
    w.walk(entry, 1.0)
    return w.ops, w.loops

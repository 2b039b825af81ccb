"""Lower and compile the real steps for a TPU topology, without the hardware.

The train step is `polychip.train.step.StepSpec.build(...).jitted` (the function `train` runs, with its
donation and shardings); serve compiles `polychip.serve.paged_model.jit_step` (the step the serving engine's
runner runs: paged KV cache, per-row sampling) at a prefill and a decode shape. Kernels are chosen
for the *target* device kind.

Every figure in a `CompiledStep` is per device (what `memory_analysis()` / `cost_analysis()` return
for an SPMD executable), except `program_flops`, which is global (all devices).
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field

from polychip.compile import hlo as hlo_mod
from polychip.compile import program_flops
from polychip.compile.errors import CompileError
from polychip.compile.target import TargetSpec, tpu_devices
from polychip.config import Config, MeshConfig
from polychip.parallel.sharding import MESH_AXES


@dataclass
class CompiledStep:
    """Raw results of compiling one step (JSON-able; cached on disk)."""

    name: str
    #: memory_analysis(), bytes per device.
    memory: dict
    #: cost_analysis() as returned: per device, each while-loop body counted once.
    cost: dict
    #: hlo.HloStats of the optimised module (per device, loop trips included).
    hlo: dict
    #: Global matmul FLOPs of the traced program (scan trips included) and with loops counted once.
    program_flops: float
    program_flops_loops_once: float
    lower_s: float
    compile_s: float
    #: Kernel implementations picked for the target.
    kernels: dict = field(default_factory=dict)
    #: Sharding rules that could not apply (axis does not divide a dimension).
    dropped_rules: list = field(default_factory=list)
    #: Why the registry's first choice of kernels was replaced (empty when it was not).
    kernel_fallback: str = ""
    #: Pallas kernel call sites whose FLOPs program_flops cannot see (counted as 0 there).
    opaque_kernel_calls: int = 0
    #: The compiler's out-of-memory message when it refused to compile (then memory holds the arguments
    #: from the shardings and the temporaries from the message; cost and hlo are empty).
    oom: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "CompiledStep":
        return CompiledStep(**d)


def _mem_dict(m) -> dict:
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes", "host_argument_size_in_bytes", "host_output_size_in_bytes",
            "host_temp_size_in_bytes", "host_alias_size_in_bytes")
    return {k.replace("_size_in_bytes", ""): int(getattr(m, k, 0) or 0) for k in keys}


def assigned_hbm(dump: str, since: float = 0.0) -> int:
    """HBM the compiler's buffer assignment allocates for the step: `Total bytes` of the default memory
    space in the memory-usage report XLA dumps (the largest module's), 0 when none was written. Not
    memory_analysis().peak_memory_in_bytes: that mixes memory spaces (llama3-70b with offloaded layer
    inputs: 57.0 GB "peak" = 28.5 GB of HBM + host memory). `since`: only reports written after it (a
    folder the user dumps several programs into)."""
    reports = sorted((p for p in glob.glob(os.path.join(dump, "*after_optimizations-memory-usage-report.txt"))
                      if os.path.getmtime(p) >= since - 1), key=os.path.getsize, reverse=True)
    for path in reports:
        with open(path) as f:
            m = re.search(r"Memory Space: default \(color=0\)\s*\nTotal bytes: (\d+)", f.read())
        if m:
            return int(m.group(1))
    return 0


def _cost_dict(c) -> dict:
    if isinstance(c, (list, tuple)):
        c = c[0] if c else {}
    c = c or {}
    return {k: float(c[k]) for k in ("flops", "bytes accessed", "optimal_seconds", "transcendentals") if k in c}


def with_mesh(cfg: Config, sizes: dict, slices: int = 1) -> Config:
    """cfg with the mesh shape compile chose (sizes: data/fsdp/tensor always; stage, context, expert when
    given), over all the target's devices; over several slices data, then stage, span them (MeshConfig.dcn_axes)."""
    axes = {a: sizes[a] for a in MESH_AXES if a in sizes}
    return dataclasses.replace(cfg, mesh=MeshConfig(**axes, slices=slices, dcn_axes=("data", "stage"),
                                                    rules=dict(cfg.mesh.rules)))


def _target(devices):
    from polychip.kernels.registry import Target

    return Target(platform="tpu", device_kind=devices[0].device_kind)


def _layout(cfg: Config, sizes: dict, devices, slices: int = 1):
    from polychip.parallel.mesh import make_mesh
    from polychip.parallel.sharding import Layout

    mc = with_mesh(cfg, sizes, slices).mesh
    return Layout.create(make_mesh(mc, devices), mc.rules)


def _policy(cfg: Config, devices):
    from polychip.kernels.registry import KernelPolicy

    return KernelPolicy.create(_target(devices), cfg.kernels.overrides())


def _kernels_used(policy, cfg: Config, seq: int, dtype: str, decode: bool) -> dict:
    """Which implementation the registry picks for the target at these shapes (for the report)."""
    m = cfg.model
    out = {}
    for op, query in (("rms_norm", {"dtype": dtype}), ("cross_entropy", {"dtype": dtype})):
        try:
            out[op] = policy.pick(op, **query).name
        except Exception as e:  # noqa: BLE001 - report only
            out[op] = f"? ({e})"
    try:
        out["attention"] = policy.pick("attention", q_len=1 if decode else seq, kv_len=seq, n_heads=m.n_heads,
                                       n_kv_heads=m.n_kv_heads, head_dim=m.head_dim, dtype=dtype, causal=True,
                                       sliding_window=None, soft_cap=None, has_q_offset=decode,
                                       has_kv_lengths=False).name
    except Exception as e:  # noqa: BLE001 - report only
        out["attention"] = f"? ({e})"
    return out


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}


def parse_oom(msg: str) -> dict | None:
    """XLA TPU's "Ran out of memory on HBM, the total memory required for HLO temporaries (1.20T) exceeds
    available HBM (15.75G)" -> {"temp": bytes, "available": bytes} (XLA prints binary units, 3 digits)."""
    m = re.search(r"temporaries \(([\d.]+)([KMGTP]?)\).*?available HBM \(([\d.]+)([KMGTP]?)\)", msg)
    if not m:
        return None
    return {"temp": int(float(m.group(1)) * _UNITS[m.group(2)]), "available": int(float(m.group(3)) * _UNITS[m.group(4)])}


def argument_bytes(args: tuple, shardings: tuple) -> int:
    """Per-device bytes of the arguments as sharded (the largest shard of each leaf)."""
    import jax
    import numpy as np

    total = 0
    for a, sh in zip(args, shardings):
        leaves = jax.tree.leaves(a)
        shs = jax.tree.leaves(sh) if sh is not None else [None] * len(leaves)
        if len(shs) != len(leaves):
            shs = [shs[0] if shs else None] * len(leaves)
        for x, s in zip(leaves, shs):
            shape = s.shard_shape(x.shape) if s is not None else x.shape
            total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def _compile(name: str, jitted, args: tuple, trace_fn, n_devices: int, on_phase=None,
             in_shardings: tuple = (), devices_per_slice: int | None = None) -> CompiledStep:
    t0 = time.perf_counter()
    if on_phase:
        on_phase(f"{name}: lowering")
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    if on_phase:
        on_phase(f"{name}: compiling (XLA TPU)")
    # The dump's memory-usage report is the compiler's own account of the HBM it assigns (assigned_hbm). A dump
    # the user asked for in XLA_FLAGS is left where it is and read there.
    user_dump = re.search(r"--xla_dump_to=(\S+)", os.environ.get("XLA_FLAGS", ""))
    dump = user_dump.group(1) if user_dump else tempfile.mkdtemp(prefix="polychip-xla-")
    try:
        since = time.time()
        compiled = lowered.compile(compiler_options={} if user_dump else {"xla_dump_to": dump, "xla_dump_hlo_as_text": True})
        assigned = assigned_hbm(dump, since)
    except Exception as e:  # noqa: BLE001 - only the compiler's OOM refusal is a result; the rest re-raise
        import jax

        oom = parse_oom(str(e)) if "RESOURCE_EXHAUSTED" in str(e) else None
        if oom is None and isinstance(e, jax.errors.JaxRuntimeError):
            # The compiler failed on a program it should build (an internal error, not a refusal of the
            # user's sizes): no fit and no estimate exist for it. Say so in one line, with the compiler's.
            text = " ".join(str(e).split())
            text = text if len(text) <= 400 else f"{text[:180]} ... {text[-200:]}"
            raise CompileError(f"the XLA TPU compiler failed on this configuration, so there is no fit or estimate "
                               f"for it: {text} (a compiler limitation "
                               f"for this combination; another remat policy or mesh may compile; --debug shows "
                               f"the whole message)") from e
        if oom is None:
            raise
        t2 = time.perf_counter()
        pf = program_flops.count(trace_fn, *args)
        mem = {"argument": argument_bytes(args, in_shardings), "output": 0, "alias": 0, "temp": oom["temp"],
               "generated_code": 0, "compiler_available_hbm": oom["available"]}
        return CompiledStep(name=name, memory=mem, cost={}, hlo=dataclasses.asdict(hlo_mod.HloStats()),
                            program_flops=pf.flops, program_flops_loops_once=pf.flops_loops_once, lower_s=t1 - t0,
                            compile_s=t2 - t1, oom=str(e).strip().splitlines()[0],
                            opaque_kernel_calls=pf.opaque_calls)
    finally:
        if not user_dump:
            shutil.rmtree(dump, ignore_errors=True)
    t2 = time.perf_counter()
    if on_phase:
        on_phase(f"{name}: analysing")
    stats = hlo_mod.analyse(compiled.as_text(), n_devices, devices_per_slice)
    pf = program_flops.count(trace_fn, *args)
    memory = {**_mem_dict(compiled.memory_analysis()), "assigned": assigned}
    return CompiledStep(name=name, memory=memory, cost=_cost_dict(compiled.cost_analysis()),
                        hlo=dataclasses.asdict(stats), program_flops=pf.flops, program_flops_loops_once=pf.flops_loops_once,
                        lower_s=t1 - t0, compile_s=t2 - t1, opaque_kernel_calls=pf.opaque_calls)


# Pallas (Mosaic) kernels lower to a custom call XLA cannot partition over a multi-device mesh unless
# the kernel wraps itself in shard_map. When that happens we compile with the XLA/jnp implementations
# instead (only for ops the user did not choose) and say so in the report.
_MOSAIC_MSG = "Mosaic kernels cannot be automatically partitioned"


def _fallback_cfg(cfg: Config, serve: bool) -> Config:
    import copy

    k = copy.copy(cfg.kernels)
    if k.attention == "auto":
        k.attention = "reference" if serve else "xla"
    if k.rms_norm == "auto":
        k.rms_norm = "reference"
    if k.cross_entropy == "auto":
        # Not xla_chunked: its lax.map over token chunks runs over a batch-sharded axis, which the SPMD
        # partitioner turns into every device walking all chunks with an all-reduce per tile
        # (llama3-8b on v6e:16x16: 8192 iterations, ~4 TB of all-reduce per device per step).
        k.cross_entropy = "reference"
    return dataclasses.replace(cfg, kernels=k)


def _with_fallback(fn, cfg: Config, serve: bool, *a, **kw):
    try:
        return fn(cfg, *a, **kw)
    except NotImplementedError as e:
        if _MOSAIC_MSG not in str(e):
            raise
        fb = _fallback_cfg(cfg, serve)
        out = fn(fb, *a, **kw)
        note = (f"Pallas TPU kernels are not wrapped in shard_map, so XLA cannot partition them over this mesh; "
                f"compiled with attention={fb.kernels.attention}, rms_norm={fb.kernels.rms_norm}, "
                f"cross_entropy={fb.kernels.cross_entropy} instead")
        for step in (out if isinstance(out, list) else [out]):
            step.kernel_fallback = note
        return out


def compile_train(cfg: Config, spec: TargetSpec, sizes: dict, on_phase=None) -> CompiledStep:
    """Compile the train step for global batch cfg.train.batch_size x cfg.train.seq_len on `spec`."""
    return _with_fallback(_compile_train, cfg, False, spec, sizes, on_phase)


def _compile_train(cfg: Config, spec: TargetSpec, sizes: dict, on_phase=None) -> CompiledStep:
    from polychip.train.step import StepSpec, check_tensor

    check_tensor(cfg.model, sizes["tensor"])
    devices = tpu_devices(spec)
    step = StepSpec.build(with_mesh(cfg, sizes, spec.num_slices), devices=devices, target=_target(devices), check=False)
    args = (step.abstract_state, step.abstract_batch)
    out = _compile("train", step.jitted, args, step.jitted, len(devices), on_phase,
                   (step.shardings, step.batch_sharding), len(devices) // spec.num_slices)
    out.kernels = _kernels_used(step.runtime.policy, cfg, cfg.train.seq_len, cfg.train.compute_dtype, False)
    out.dropped_rules = step.dropped()
    return out


#: Tokens per KV block in compiled serve steps (the engine's default, EngineConfig.page_size).
SERVE_PAGE_SIZE = 16


def compile_serve(cfg: Config, spec: TargetSpec, sizes: dict, batch: int, prompt: int, cache_len: int,
                  on_phase=None) -> list[CompiledStep]:
    """Compile the server's step (polychip.serve.paged_model.jit_step, what the engine's runner runs)
    twice: "prefill" feeds `batch` prompts of `prompt` tokens in one [batch, prompt] call, "decode"
    one token for each of `batch` sequences. The paged KV pool holds every sequence's cache_len
    tokens (+ the scratch block); block tables span cache_len, so decode attention reads all of it
    (masked). Parameters and cache are in the compute dtype."""
    return _with_fallback(_compile_serve, cfg, True, spec, sizes, batch, prompt, cache_len, on_phase)


def _compile_serve(cfg: Config, spec: TargetSpec, sizes: dict, batch: int, seq: int, cache_len: int,
                   on_phase=None) -> list[CompiledStep]:
    from polychip.kernels.registry import KernelPolicy, Target
    from polychip.model import transformer as T
    from polychip.serve import paged_model as PM

    devices = tpu_devices(spec)
    layout = _layout(cfg, sizes, devices, spec.num_slices)
    overrides = cfg.kernels.overrides()
    if overrides.get("attention") == "reference":  # the paged kernel follows attention to the reference
        overrides["paged_attention"] = "reference"
    policy = KernelPolicy.create(Target(platform="tpu", device_kind=devices[0].device_kind), overrides)
    dtype = cfg.train.compute_dtype
    rt = T.Runtime(policy=policy, layout=layout, compute_dtype=dtype, remat="none")
    pages = PM.pages_for(cache_len, SERVE_PAGE_SIZE)
    out = []
    for name, width in (("prefill", seq), ("decode", 1)):
        args = PM.abstract_step_args(cfg.model, T.DTYPES[dtype], batch, width, batch * pages + 1, SERVE_PAGE_SIZE,
                                     pages)
        shardings = PM.step_shardings(cfg.model, layout, args)
        jitted = PM.jit_step(cfg.model, rt, shardings)
        step = _compile(name, jitted, tuple(args), jitted, len(devices), on_phase, tuple(shardings[0]),
                        len(devices) // spec.num_slices)
        step.kernels = _kernels_used(policy, cfg, seq, dtype, True)
        if name == "decode":
            step.kernels["paged_attention"] = _paged_kernel(policy, cfg, args)
        out.append(step)
    return out


def _paged_kernel(policy, cfg: Config, args) -> str:
    """The paged-attention implementation the registry picks for the decode step (for the report)."""
    m, (_, K, P, ps, D) = cfg.model, args.kv["k"].shape
    try:
        return policy.pick("paged_attention", batch=args.tokens.shape[0], n_heads=m.n_heads, n_kv_heads=K,
                           head_dim=D, page_size=ps, total_pages=P, max_pages=args.block_tables.shape[1],
                           dtype=cfg.train.compute_dtype, soft_cap=None).name
    except Exception as e:  # noqa: BLE001 - report only
        return f"? ({e})"

"""One compile request end to end: resolve config + target + mesh, compile (or read the cache), report."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from polychip.compile import cache as cache_mod
from polychip.compile import report as rep
from polychip.compile.errors import CompileError
from polychip.compile.lower import CompiledStep, compile_serve, compile_train
from polychip.compile.target import TargetSpec, check_batch, parse_mesh, parse_target
from polychip.config import Config, build_config, to_dict


@dataclass
class Request:
    """What the user asked for. None means "from the preset"."""

    model: str
    target: str
    mesh: str | None = None
    batch: int | None = None
    seq: int | None = None
    mode: str = "train"
    overrides: tuple = ()
    #: serve: tokens generated per request (the KV cache holds seq + output_tokens).
    output_tokens: int = 128
    use_cache: bool = True


@dataclass
class Resolved:
    cfg: Config
    spec: TargetSpec
    sizes: dict
    batch: int
    seq: int
    cache_len: int = 0
    extra: dict = field(default_factory=dict)


def resolve(req: Request) -> Resolved:
    if req.mode not in ("train", "serve"):
        raise CompileError(f"mode {req.mode!r} is not valid; valid modes: train, serve")
    spec = parse_target(req.target)
    ov = list(req.overrides)
    if req.batch is not None:
        if req.batch < 1:
            raise CompileError(f"batch must be >= 1, got {req.batch}")
        ov.append(f"train.batch_size={req.batch}")
    if req.seq is not None and req.mode == "train":
        ov.append(f"train.seq_len={req.seq}")
    cfg = build_config(req.model, None, ov)
    sizes = parse_mesh(req.mesh, spec.n_devices, spec.num_slices)
    batch = cfg.train.batch_size
    if req.mode == "train":
        check_batch(batch, cfg.train.grad_accum, sizes)
        return Resolved(cfg, spec, sizes, batch, cfg.train.seq_len)
    if req.output_tokens < 1:
        raise CompileError(f"output tokens must be >= 1, got {req.output_tokens}")
    seq = req.seq if req.seq is not None else cfg.model.max_seq_len - req.output_tokens
    cache_len = seq + req.output_tokens
    if seq < 1 or cache_len > cfg.model.max_seq_len:
        raise CompileError(f"prompt {seq} + output {req.output_tokens} tokens must fit the model's context "
                           f"model.max_seq_len={cfg.model.max_seq_len}")
    check_batch(batch, 1, sizes)
    return Resolved(cfg, spec, sizes, batch, seq, cache_len)


def _cache_payload(r: Resolved, mode: str) -> dict:
    d = to_dict(r.cfg)
    for k in ("out_dir", "data", "distributed"):
        d.pop(k, None)
    return {"cfg": d, "target": r.spec.text, "mesh": r.sizes, "mode": mode, "batch": r.batch, "seq": r.seq,
            "cache_len": r.cache_len}


@contextmanager
def progress(label: str, enabled: bool = True):
    """A rich spinner on stderr with the phase and elapsed seconds; yields a phase setter."""
    if not enabled:
        yield lambda phase: None
        return
    from rich.console import Console

    console = Console(stderr=True)
    state = {"phase": "starting", "t0": time.perf_counter()}
    stop = threading.Event()
    with console.status(f"{label}: starting") as status:
        def tick():
            while not stop.wait(0.5):
                status.update(f"{label}: {state['phase']} [{time.perf_counter() - state['t0']:.0f} s]")

        th = threading.Thread(target=tick, daemon=True)
        th.start()
        try:
            yield lambda phase: state.__setitem__("phase", phase)
        finally:
            stop.set()
            th.join()


def compiled_steps(r: Resolved, mode: str, use_cache: bool = True, show_progress: bool = False) -> tuple[list[CompiledStep], bool]:
    """Compile (or load from cache) the steps of `mode`. Returns (steps, whether from cache)."""
    k = cache_mod.key(_cache_payload(r, mode))
    if use_cache:
        hit = cache_mod.load(k)
        if hit is not None:
            try:
                return [CompiledStep.from_dict(s) for s in hit["steps"]], True
            except (KeyError, TypeError):
                pass  # stale layout: recompile and overwrite
    label = f"compile {mode} for {r.spec.text} ({r.spec.n_devices} devices, mesh {rep.fmt_mesh(r.sizes)})"
    with progress(label, show_progress) as phase:
        if mode == "train":
            steps = [compile_train(r.cfg, r.spec, r.sizes, on_phase=phase)]
        else:
            steps = compile_serve(r.cfg, r.spec, r.sizes, r.batch, r.seq, r.cache_len, on_phase=phase)
    cache_mod.store(k, {"steps": [s.to_dict() for s in steps]})
    return steps, False


def compile_report(req: Request, show_progress: bool = False) -> dict:
    """The full report (see report.py) for one request."""
    r = resolve(req)
    dtype = r.cfg.train.compute_dtype
    if r.spec.kind != "tpu":
        steps = rep.modelled_reports(r.cfg, r.spec, req.mode, r.batch, r.seq, dtype, req.output_tokens, r.sizes)
        out = rep.build(r.cfg, req.model, r.spec, r.sizes, req.mode, r.batch, r.seq, steps, req.output_tokens)
        out["measured"] = measure_if_present(r, req)
        return out
    compiled, cached = compiled_steps(r, req.mode, req.use_cache, show_progress)
    reports = []
    for c in compiled:
        seq = r.cache_len if c.name == "decode" else r.seq
        reports.append(rep.step_report(c, r.cfg, r.spec, r.batch, seq, dtype))
    out = rep.build(r.cfg, req.model, r.spec, r.sizes, req.mode, r.batch, r.seq, reports, req.output_tokens, cached)
    out["kernels"] = {c.name: c.kernels for c in compiled}
    return out


def measure_if_present(r: Resolved, req: Request) -> dict | None:
    """On a host that has the target GPU, compile and time the real step (see measure.py)."""
    from polychip.compile import measure

    return measure.measure_local(r, req)

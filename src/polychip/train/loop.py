"""The training loop: data -> mesh -> state (fresh or restored) -> jitted steps -> metrics -> checkpoints.

Preemption: SIGTERM and SIGINT (Ctrl-C) set a flag; the loop finishes the step in flight, writes a
checkpoint and exits with 128 + signal number. The next `train` with the same out_dir resumes from it
and, because batches are a pure function of (seed, step), sees exactly the batches it would have.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from polychip.config import Config, ConfigError, save_yaml, to_dict
from polychip.kernels.registry import KernelPolicy, Target
from polychip.model.flops import train_flops_per_step
from polychip.parallel import distributed
from polychip.parallel.mesh import make_mesh
from polychip.parallel.sharding import Layout
from polychip.train import step as S
from polychip.train.checkpoint import Checkpointer
from polychip.train.metrics import MetricsLogger


@dataclass
class TrainResult:
    steps_run: int
    final_step: int
    losses: list[float] = field(default_factory=list)
    interrupted: int = 0  # signal number that stopped the run, 0 if it finished
    resumed_from: int | None = None
    state: Any = None


class _StopFlag:
    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (tests calling train in a thread)
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def check_shapes(cfg: Config, layout: Layout) -> None:
    t = cfg.train
    div = layout.batch_divisor
    micro = t.batch_size // t.grad_accum
    if micro % div:
        raise ConfigError(
            f"micro-batch {micro} (train.batch_size={t.batch_size} / train.grad_accum={t.grad_accum}) is not divisible "
            f"by the data-parallel ways {div} (mesh data x fsdp = {layout.mesh.shape['data']} x {layout.mesh.shape['fsdp']})")
    if t.batch_size % jax.process_count():
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the {jax.process_count()} processes")
    m = cfg.model
    tp = layout.mesh.shape["tensor"]
    if tp > 1 and m.n_heads % tp:
        raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by mesh.tensor={tp}")


def make_global_batch(local: np.ndarray, sharding) -> jax.Array:
    """This process's rows -> one global array laid out by `sharding` (multi-process aware)."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local)


def train(cfg: Config, log=print, stop_after: int | None = None) -> TrainResult:
    """Run (or resume) training as configured. `stop_after` ends the loop early after that many steps
    in this call (without changing the schedule): for tests of interrupted runs."""
    cfg.validate()
    distributed.initialize(cfg.distributed)
    from polychip.data.batches import prepare
    from polychip.data.tokenizer import check_vocab

    out = Path(cfg.out_dir)
    is_main = jax.process_index() == 0
    mesh = make_mesh(cfg.mesh)
    layout = Layout.create(mesh, cfg.mesh.rules)
    check_shapes(cfg, layout)
    policy = KernelPolicy.create(Target.of(), cfg.kernels.overrides())
    rt = S.make_runtime(cfg, policy, layout)

    # Data: process 0 builds tokenizer + token cache first; the others then reuse them.
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        tok, stream = prepare(cfg.data, out, cfg.model.vocab_size)
        save_yaml(cfg, out / "config.yaml")
    _sync("polychip_data")
    if not is_main:
        tok, stream = prepare(cfg.data, out, cfg.model.vocab_size)
    check_vocab(tok, cfg.model.vocab_size)

    abstract = S.abstract_state(cfg)
    shardings = S.state_shardings(cfg, layout, abstract)
    for d in layout.dropped(S.T.param_axes(cfg.model), abstract["params"]):
        log(f"note: replicated where the mesh does not divide: {d}")
    ckpt = Checkpointer(out, keep=cfg.train.keep_checkpoints)
    meta_want = {"model": to_dict(cfg.model)}
    with_sh = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
    restored = ckpt.restore(jax.tree.map(with_sh, abstract["params"], shardings["params"]),
                            jax.tree.map(with_sh, abstract["opt_state"], shardings["opt_state"]),
                            want_meta=meta_want, log=log)
    if restored is not None:
        start, params, opt_state, _ = restored
        state = {"step": jax.device_put(jnp.asarray(start, jnp.int32), shardings["step"]), "params": params,
                 "opt_state": opt_state}
        log(f"resumed from checkpoint step {start} in {ckpt.dir}")
    else:
        start = 0
        state = S.init_state(cfg, layout)
    result = TrainResult(steps_run=0, final_step=start, resumed_from=start if restored else None)

    t = cfg.train
    flops = train_flops_per_step(cfg.model, t.batch_size, t.seq_len)
    metrics = MetricsLogger(out, flops, jax.device_count(), t.compute_dtype, t.steps, enabled=is_main)
    if is_main:
        log(f"model {cfg.model.n_params / 1e6:.2f}M params | mesh {dict(mesh.shape)} on {jax.device_count()} "
            f"{jax.devices()[0].platform} devices x {jax.process_count()} process(es) | "
            f"batch {t.batch_size}x{t.seq_len} | peak {metrics.peak_source}: "
            f"{'n/a' if not metrics.peak else f'{metrics.peak / 1e12:.2f} TFLOP/s/device'}")
    step_fn = S.jit_train_step(cfg, rt, shardings)
    bsh = S.batch_sharding(layout)
    tokens_per_step = t.batch_size * t.seq_len
    step = start
    try:
        with _StopFlag() as stop:
            while step < t.steps:
                local = stream.batch(step, t.batch_size, t.seq_len, process_index=jax.process_index(),
                                     process_count=jax.process_count())
                batch = make_global_batch(local, bsh)
                t0 = time.perf_counter()
                state, m = step_fn(state, batch)
                m = jax.device_get(m)  # waits for the step: honest per-step time
                dt = time.perf_counter() - t0
                step += 1
                result.steps_run += 1
                result.losses.append(float(m["loss"]))
                first = result.steps_run == 1
                metrics.record(step, m, dt, tokens_per_step,
                               print_line=first or step % max(1, t.log_every) == 0 or step == t.steps, compiled=first)
                if t.eval_every and step % t.eval_every == 0:
                    _eval(cfg, rt, state, stream, bsh, step, log)
                if stop.signum or (stop_after is not None and result.steps_run >= stop_after):
                    result.interrupted = stop.signum
                    break
                if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.steps:
                    ckpt.save(step, state["params"], state["opt_state"], _meta(cfg, step))
        ckpt.save(step, state["params"], state["opt_state"], _meta(cfg, step))
        if result.interrupted and is_main:
            log(f"interrupted by signal {result.interrupted}: checkpoint written at step {step}; "
                f"run the same command to resume")
    finally:
        metrics.close()
        ckpt.close()
    result.final_step = step
    result.state = state
    return result


def _meta(cfg: Config, step: int) -> dict:
    return {"model": to_dict(cfg.model), "step": step, "config": to_dict(cfg)}


_EVAL_FNS: dict = {}


def _eval(cfg, rt, state, stream, bsh, step, log):
    key = (cfg.model, rt)
    if key not in _EVAL_FNS:
        _EVAL_FNS[key] = jax.jit(S.eval_step_fn(cfg, rt))
    t = cfg.train
    local = stream.batch(0, t.batch_size, t.seq_len, split="eval", process_index=jax.process_index(),
                         process_count=jax.process_count())
    loss = float(_EVAL_FNS[key](state["params"], make_global_batch(local, bsh)))
    if jax.process_index() == 0:
        log(f"step {step}: eval loss {loss:.4f}")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)

"""The training loop: data -> mesh -> state (fresh or restored) -> jitted steps -> metrics -> checkpoints.

Preemption: SIGTERM and SIGINT (Ctrl-C) set a flag; the loop finishes the step in flight, writes a
checkpoint and exits with 128 + signal number. The next `train` with the same out_dir resumes from it
and, because batches are a pure function of (seed, step), sees exactly the batches it would have.
A step whose loss or gradient norm is not finite stops the run (`health.NonFiniteError`) without
saving it: the last good checkpoint stays the newest. Process 0 holds a lock on the run folder
(`files.RunLock`), so two runs on one folder cannot interleave checkpoints and metrics.
What a run records (metrics.jsonl, TensorBoard events, events.jsonl, a profile, goodput.json) goes
through one `observe.RunObserver`, whose calls also drive the goodput lap clock.
"""
from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from polychip.config import Config, save_yaml, to_dict
from polychip.files import RunLock
from polychip.parallel import distributed
from polychip.train.checkpoint import Checkpointer
from polychip.train.health import check_finite
from polychip.train.goodput import GoodputClock
from polychip.train.observe import RunObserver
from polychip.train.step import StepSpec


_CLOCK_KEYS = ("started_at", "wall_s", "seconds", "goodput")  # what GoodputClock.summary fills in itself


@dataclass
class TrainResult:
    steps_run: int
    final_step: int
    losses: list[float] = field(default_factory=list)
    interrupted: int = 0  # signal number that stopped the run, 0 if it finished
    resumed_from: int | None = None
    state: Any = None
    goodput: dict | None = None  # this attempt's wall-time accounting (goodput.GoodputClock.summary)


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


def train(cfg: Config, log=print, stop_after: int | None = None) -> TrainResult:
    """Run (or resume) training as configured. `stop_after` ends the loop early after that many steps
    in this call (without changing the schedule): for tests of interrupted runs."""
    clock = GoodputClock()  # first: every second of the call is charged to a goodput category
    cfg.validate()
    distributed.initialize(cfg.distributed)
    spec = StepSpec.build(cfg)
    out = Path(cfg.out_dir)
    with RunLock(out) if jax.process_index() == 0 else contextlib.nullcontext():
        stream = _prepare_data(cfg, out)
        for d in spec.dropped():
            log(f"note: replicated where the mesh does not divide: {d}")
        ckpt, obs = Checkpointer(out, keep=cfg.train.keep_checkpoints), None
        try:
            clock.lap("startup")
            state, start = _restore_or_init(spec, ckpt, log)
            clock.lap("restore" if start else "startup")
            obs = RunObserver(spec, out, start, clock, log)
            result = _run_steps(spec, state, start, stream, ckpt, obs, stop_after)
        except BaseException:
            if obs is not None:
                obs.close()
            raise
        finally:
            ckpt.close()
        clock.lap("checkpoint")  # closing the checkpointer waits for its last writes
        try:
            summary = obs.finish(result.final_step, result.steps_run, result.interrupted)
        finally:
            obs.close()
        # The returned account also charges what came after goodput.json was saved (closing the observer's
        # files): the file cannot include its own write, the caller's figure can.
        clock.lap("logging")
        result.goodput = clock.summary(**{k: v for k, v in summary.items() if k not in _CLOCK_KEYS})
        return result


def _prepare_data(cfg: Config, out: Path):
    """Process 0 builds the tokenizer + token cache first; the others then reuse them."""
    from polychip.data.batches import prepare
    from polychip.data.tokenizer import check_vocab

    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
        tok, stream = prepare(cfg.data, out, cfg.model.vocab_size)
        save_yaml(cfg, out / "config.yaml")
    _sync("polychip_data")
    if jax.process_index() != 0:
        tok, stream = prepare(cfg.data, out, cfg.model.vocab_size)
    check_vocab(tok, cfg.model.vocab_size)
    return stream


def _restore_or_init(spec: StepSpec, ckpt: Checkpointer, log) -> tuple[dict, int]:
    """(state, first step): the newest good checkpoint restored onto this mesh, or a fresh state."""
    target = spec.sharded_abstract_state()
    restored = ckpt.restore(target["params"], target["opt_state"], want_meta={"model": to_dict(spec.cfg.model)},
                            log=log)
    if restored is None:
        return spec.init_state(), 0
    start, params, opt_state, _ = restored
    step = jax.device_put(jnp.asarray(start, jnp.int32), spec.shardings["step"])
    log(f"resumed from checkpoint step {start} in {ckpt.dir}")
    return {"step": step, "params": params, "opt_state": opt_state}, start


def _run_steps(spec: StepSpec, state: dict, start: int, stream, ckpt: Checkpointer, obs: RunObserver,
               stop_after: int | None) -> TrainResult:
    cfg, t = spec.cfg, spec.cfg.train
    result = TrainResult(steps_run=0, final_step=start, resumed_from=start if start else None)
    step_fn, tokens_per_step, step, saved = spec.jitted, t.batch_size * t.seq_len, start, start or None
    rows = {"process_index": jax.process_index(), "process_count": jax.process_count()}
    with _StopFlag() as stop:
        while step < t.steps:
            obs.before_step(step + 1)
            batch = spec.put_batch(stream.batch(step, t.batch_size, t.seq_len, **rows))
            obs.clock.lap("data")
            t0 = time.perf_counter()
            with obs.profiler.annotation(step + 1):
                state, m = step_fn(state, batch)
                m = jax.device_get(m)  # waits for the step: honest per-step time
            dt = time.perf_counter() - t0
            check_finite(step + 1, m, last_checkpoint=saved)
            step += 1
            result.steps_run += 1
            result.losses.append(float(m["loss"]))
            obs.step_done(step, m, dt, tokens_per_step,
                          print_line=result.steps_run == 1 or step % max(1, t.log_every) == 0 or step == t.steps)
            if t.eval_every and step % t.eval_every == 0:
                obs.eval_done(step, _eval(spec, state, stream))
            if stop.signum or (stop_after is not None and result.steps_run >= stop_after):
                result.interrupted = stop.signum
                break
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.steps:
                ckpt.save(step, state["params"], state["opt_state"], _meta(cfg, step))
                obs.checkpoint_done(step)
                saved = step
    ckpt.save(step, state["params"], state["opt_state"], _meta(cfg, step))
    obs.checkpoint_done(step)
    if result.interrupted and jax.process_index() == 0:
        obs.log(f"interrupted by signal {result.interrupted}: checkpoint written at step {step}; "
                f"run the same command to resume")
    result.final_step, result.state = step, state
    return result


def _meta(cfg: Config, step: int) -> dict:
    return {"model": to_dict(cfg.model), "step": step, "config": to_dict(cfg)}


def _eval(spec: StepSpec, state: dict, stream) -> float:
    """Held-out loss on the first eval batch (the same batch every time, so evals compare)."""
    t = spec.cfg.train
    local = stream.batch(0, t.batch_size, t.seq_len, split="eval", process_index=jax.process_index(),
                         process_count=jax.process_count())
    return float(spec.jitted_eval(state["params"], spec.put_batch(local)))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)

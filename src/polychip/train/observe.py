"""Everything a training run records besides checkpoints, behind one object the loop calls at each moment.

Into the run folder (process 0 only): metrics.jsonl and the console line (MetricsLogger), TensorBoard
events (tboard.TensorBoard), events.jsonl (start/resume, checkpoint, eval, end: what `polychip report`
draws as events), a jax.profiler trace of train.profile_steps under profile/, and goodput.json with
the wall-time accounting of goodput.GoodputClock, which these methods drive with their laps.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import jax

from polychip.config import to_dict
from polychip.model.flops import train_flops_per_step
from polychip.train import goodput
from polychip.train.metrics import MetricsLogger
from polychip.train.tboard import TensorBoard

EVENTS = "events.jsonl"
PROFILE_DIR = "profile"


def logged_steps(out: Path) -> int:
    """Highest step in <out>/metrics.jsonl (0 if none): what earlier attempts of this run reached."""
    path, top = out / "metrics.jsonl", 0
    if not path.exists():
        return 0
    for line in path.read_text().splitlines():
        try:
            top = max(top, int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):  # a line cut short by a killed process
            continue
    return top


def device_memory(device) -> dict[str, float]:
    """Device memory in bytes where the platform reports it (GPU, TPU); {} elsewhere (CPU)."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - some plugins raise instead of returning None
        return {}
    return {f"mem_{k}": float(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in stats}


class Profiler:
    """A jax.profiler trace of the steps in `steps` (first, last; counted from 1) into `folder`:
    XProf's .xplane.pb (TensorBoard's profile tab) and perfetto_trace.json.gz (ui.perfetto.dev).
    The trace starts when the run reaches the first step, so an attempt resumed inside the range (or
    past it) does not trace again."""

    def __init__(self, folder: Path, steps: tuple[int, int] | None, log):
        self.folder, self.steps, self.log = folder, steps, log
        self.active = self.done = False

    def before(self, step: int) -> None:
        if self.steps and not (self.active or self.done) and step == self.steps[0]:
            self.folder.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.folder), create_perfetto_trace=True)
            self.active, self._first = True, step

    def annotation(self, step: int):
        return jax.profiler.StepTraceAnnotation("train", step_num=step) if self.active else contextlib.nullcontext()

    def after(self, step: int) -> None:
        if self.active and step >= self.steps[1]:
            self.close(step)

    def close(self, step: int | None = None) -> None:
        if not self.active:
            return
        jax.profiler.stop_trace()
        self.active, self.done = False, True
        traces = sorted(self.folder.glob("plugins/profile/*/perfetto_trace.json.gz"))
        where = f"open {traces[-1]} at ui.perfetto.dev, or " if traces else ""
        self.log(f"profile of steps {self._first}-{step or '?'} written to {self.folder} "
                 f"({where}`pip install xprof; xprof --logdir {self.folder}`)")


class RunObserver:
    """Built once per attempt, after the state is restored or initialised (step `start`)."""

    def __init__(self, spec, out: Path, start: int, clock: goodput.GoodputClock, log):
        cfg, t = spec.cfg, spec.cfg.train
        self.main = jax.process_index() == 0
        self.out, self.start, self.clock, self.log = out, start, clock, log
        self.redo_until = logged_steps(out) if self.main else 0
        self.metrics = _metrics_logger(spec, out, log, self.main)
        self.tb = TensorBoard(out, enabled=self.main and t.tensorboard,
                              purge_step=start + 1 if (start or self.redo_until) else None, log=log)
        self._events = open(out / EVENTS, "a") if self.main else None
        self.profiler = Profiler(out / PROFILE_DIR, t.profile_range() if self.main else None, log)
        self._device, self._first = jax.local_devices()[0], True
        self.event("resume" if start else "start", start, recomputed_steps=max(0, self.redo_until - start),
                   restore_s=clock.seconds["restore"], processes=jax.process_count(), devices=jax.device_count(),
                   platform=jax.devices()[0].platform)
        self.tb.text("config", "```\n" + json.dumps(to_dict(cfg), indent=1) + "\n```", start)
        clock.lap("logging")

    def event(self, kind: str, step: int, **fields) -> None:
        if self._events is not None:
            self._events.write(json.dumps({"event": kind, "step": step, "time": time.time(), **fields}) + "\n")
            self._events.flush()

    def before_step(self, step: int) -> None:
        """`step` (counted from 1) is about to run."""
        self.profiler.before(step)
        self.clock.lap("logging")

    def step_done(self, step: int, m: dict, dt: float, tokens: int, print_line: bool) -> None:
        """Charges the time since the batch was ready to compile / recompute / step, then records."""
        self.clock.lap("compile" if self._first else "recompute" if step <= self.redo_until else "step")
        row = self.metrics.record(step, m, dt, tokens, print_line=print_line, compiled=self._first,
                                  extra=device_memory(self._device))
        self.tb.record(step, row)
        self.profiler.after(step)
        self._first = False
        self.clock.lap("logging")

    def eval_done(self, step: int, loss: float) -> None:
        seconds = self.clock.lap("eval")
        if self.main:
            self.log(f"step {step}: eval loss {loss:.4f}")
        self.tb.scalars(step, {"eval/loss": loss})
        self.event("eval", step, eval_loss=loss, eval_s=seconds)
        self.clock.lap("logging")

    def checkpoint_done(self, step: int) -> None:
        seconds = self.clock.lap("checkpoint")
        self.event("checkpoint", step, save_s=seconds)
        if self.main:  # a snapshot, so an attempt that is killed later still leaves its accounting
            goodput.save(self.out, self.clock.summary(final_step=step, resumed_from=self.start or None))
        self.clock.lap("logging")

    def finish(self, final_step: int, steps_run: int, interrupted: int) -> dict:
        """End of the attempt: goodput printed, saved to goodput.json and TensorBoard; returns the summary."""
        self.profiler.close(final_step)
        self.clock.lap("logging")
        extra = dict(final_step=final_step, steps_run=steps_run, resumed_from=self.start or None,
                     interrupted=interrupted)
        summary = self.clock.summary(**extra)
        if self.main:
            self.tb.scalars(final_step, {f"goodput/{c}_s": s for c, s in summary["seconds"].items()})
            self.tb.scalars(final_step, {"goodput/fraction": summary["goodput"], "goodput/wall_s": summary["wall_s"]})
        # Closing the TensorBoard writer joins its thread (~0.1 s): charged to logging in goodput.json and the
        # returned summary (the TensorBoard scalars above were written just before it).
        self.tb.close()
        self.clock.lap("logging")
        summary = self.clock.summary(**extra)
        if self.main:
            goodput.save(self.out, summary)
            self.event("interrupted" if interrupted else "end", final_step, wall_s=summary["wall_s"],
                       goodput=summary["goodput"])
            self.log(goodput.describe(summary))
        return summary

    def close(self) -> None:
        self.profiler.close()
        self.tb.close()
        self.metrics.close()
        if self._events is not None:
            self._events.close()
            self._events = None


def _metrics_logger(spec, out: Path, log, is_main: bool) -> MetricsLogger:
    cfg, t = spec.cfg, spec.cfg.train
    flops = train_flops_per_step(cfg.model, t.batch_size, t.seq_len)
    metrics = MetricsLogger(out, flops, jax.device_count(), t.compute_dtype, t.steps, enabled=is_main)
    if is_main:
        peak = "n/a" if not metrics.peak else f"{metrics.peak / 1e12:.2f} TFLOP/s/device"
        log(f"model {cfg.model.n_params / 1e6:.2f}M params | mesh {dict(spec.layout.mesh.shape)} on "
            f"{jax.device_count()} {jax.devices()[0].platform} devices x {jax.process_count()} process(es) | "
            f"batch {t.batch_size}x{t.seq_len} | peak {metrics.peak_source}: {peak}")
    return metrics

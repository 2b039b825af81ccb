"""Profile capture on request: a jax.profiler trace of the engine's next N steps (`POST /admin/profile`).

The trace is started on the caller's thread, so a refusal (a capture already running, a profiler that
cannot start) reaches the HTTP client at once; the engine thread counts its steps (one prefill chunk
or one decode batch each, as in Engine.stats()["steps"]) and stops the trace after the N-th. Output:
XProf's .xplane.pb (TensorBoard's profile tab, `xprof --logdir DIR`) and perfetto_trace.json.gz
(ui.perfetto.dev) under DIR/plugins/profile/<timestamp>/, as the training profiler writes them.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import jax

MAX_STEPS = 1000  # a trace of more steps grows to gigabytes and takes minutes to write

log = logging.getLogger("polychip.serve")


class ProfileBusy(RuntimeError):
    """A capture is already running (the HTTP layer answers 409)."""


class ProfileCapture:
    def __init__(self):
        self._lock = threading.Lock()
        self.folder: Path | None = None  # of the running or last capture
        self.steps_left = 0
        self.step = 0

    @property
    def active(self) -> bool:
        return self.steps_left > 0

    def start(self, folder: Path, steps: int) -> Path:
        """Begin tracing into `folder`; the trace stops after `steps` engine steps. Raises ValueError for
        steps outside 1..MAX_STEPS, ProfileBusy while another capture runs."""
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be in 1..{MAX_STEPS}, got {steps}")
        with self._lock:
            if self.active:
                raise ProfileBusy(f"a profile capture into {self.folder} is running ({self.steps_left} steps left)")
            folder.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(folder), create_perfetto_trace=True)
            self.folder, self.steps_left, self.step = folder, steps, 0
        return folder

    def annotation(self, kind: str):
        """Mark one engine step in the trace (XProf's step view groups by it)."""
        if not self.active:
            return contextlib.nullcontext()
        return jax.profiler.StepTraceAnnotation(f"serve_{kind}", step_num=self.step)

    def step_done(self) -> None:
        """Called by the engine thread after each step; stops the trace after the last one."""
        with self._lock:
            if not self.active:
                return
            self.step += 1
            self.steps_left -= 1
            if self.steps_left == 0:
                self._stop()

    def close(self) -> None:
        """Stop a running capture early (server shutdown)."""
        with self._lock:
            if self.active:
                self.steps_left = 0
                self._stop()

    def _stop(self) -> None:
        jax.profiler.stop_trace()
        log.info("profile of %d engine steps written to %s", self.step, self.folder)

    def status(self) -> dict:
        with self._lock:
            files = sorted(str(p) for p in self.folder.glob("plugins/profile/*/*")) if self.folder else []
            return {"active": self.active, "steps_left": self.steps_left, "path": str(self.folder) if self.folder else None,
                    "files": [] if self.active else files}

"""Per-step metrics to JSONL and the console, with MFU against the chip's peak from the catalog.

MFU = model FLOPs per step (polychip.model.flops: 6N-style matmuls + causal attention) /
      (step time x number of devices x peak FLOP/s of one device for the compute dtype).
On CPU the peak is this machine's measured matmul rate (hardware.detect, measured once, cached).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from polychip.model.flops import mfu


def peak_flops_per_device(compute_dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s of one device of the kind in use, where the figure comes from)."""
    try:
        from polychip.hardware.detect import current_chip
    except ImportError:  # pragma: no cover - hardware package always ships
        return None, "no hardware catalog"
    chip = current_chip()
    try:
        peak = chip.device_peak(compute_dtype)
    except Exception:  # noqa: BLE001 - unknown dtype/peak: MFU n/a rather than a crash
        peak = None
    return peak, chip.name


class MetricsLogger:
    """Appends one JSON object per logged step to <out>/metrics.jsonl and prints a console line."""

    def __init__(self, out_dir: str | Path | None, flops_per_step: float, n_devices: int, compute_dtype: str,
                 total_steps: int, enabled: bool = True, stream=None):
        self.path = Path(out_dir) / "metrics.jsonl" if out_dir else None
        self.flops_per_step = flops_per_step
        self.n_devices = n_devices
        self.peak, self.peak_source = peak_flops_per_device(compute_dtype)
        self.total = total_steps
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self._f = open(self.path, "a") if (self.path and enabled) else None
        self._progress = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            # A live bar on terminals (loss, tokens/s, MFU, ETA); plain lines otherwise (logs, CI).
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                      TextColumn("{task.fields[status]}"), TimeRemainingColumn(), transient=True)
            self._task = self._progress.add_task("train", total=total_steps, status="compiling...")
            self._progress.start()

    def mfu(self, step_time: float) -> float | None:
        return mfu(self.flops_per_step, step_time, self.n_devices, self.peak)

    def record(self, step: int, metrics: dict[str, Any], step_time: float, tokens: int, print_line: bool,
               compiled: bool = False, extra: dict[str, float] | None = None) -> dict:
        """One row (returned, and appended to metrics.jsonl); `extra` adds fields such as device memory."""
        rec = {"step": step, **{k: float(v) for k, v in metrics.items()}, "step_time_s": step_time,
               "tokens_per_s": tokens / step_time if step_time > 0 else None,
               "mfu": None if compiled else self.mfu(step_time), "time": time.time(), **(extra or {})}
        if compiled:
            rec["includes_compile"] = True
        if self._f:
            self._f.write(json.dumps(rec) + "\n")
            self._f.flush()
        mfu = rec["mfu"]
        line = (f"step {step:>6}/{self.total}  loss {rec['loss']:.4f}  gnorm {rec['grad_norm']:.3f}  "
                f"lr {rec['lr']:.2e}  {rec['tokens_per_s']:,.0f} tok/s  {step_time * 1e3:.0f} ms/step  "
                f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}" + (" (includes compile)" if compiled else ""))
        if self._progress is not None:
            self._progress.update(self._task, completed=step, status=line.split("/", 1)[1].split(None, 1)[1])
            if print_line:
                self._progress.console.print(line, highlight=False, markup=False)
        elif print_line and self.enabled:
            self.stream.write(line + "\n")
            self.stream.flush()
        return rec

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._f:
            self._f.close()
            self._f = None

"""Goodput: where a run's wall time went, and the share of it spent on steps that moved training on.

Each attempt (one `train` process, from its start to its end) is split by a lap clock: every call to
`lap(category)` charges the time since the previous lap to that category, so no second is dropped
or counted twice. Categories:

  startup     config, mesh, data preparation, tokenizer, fresh parameters
  restore     reading the checkpoint a resumed attempt starts from
  compile     the first step of the attempt (tracing + XLA compilation + one step)
  step        productive steps
  recompute   steps an earlier attempt had already run past its last checkpoint (lost to the restart)
  data        building and placing batches (time the device waited for input)
  eval        held-out evaluation
  checkpoint  writing checkpoints
  logging     metrics, TensorBoard, console, health checks, profiler start/stop

goodput = step / wall. <run>/goodput.json keeps every attempt and their totals.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from polychip.files import atomic_write_json

CATEGORIES = ("startup", "restore", "compile", "step", "recompute", "data", "eval", "checkpoint", "logging")
FILE = "goodput.json"


class GoodputClock:
    """Lap clock over the categories above; starts when created."""

    def __init__(self):
        self.started_at = time.time()
        self._t0 = self._last = time.perf_counter()
        self.seconds = dict.fromkeys(CATEGORIES, 0.0)

    def lap(self, category: str) -> float:
        """Charge the time since the previous lap to `category`; returns that time."""
        now = time.perf_counter()
        dt, self._last = now - self._last, now
        self.seconds[category] += dt
        return dt

    def summary(self, **extra) -> dict:
        """This attempt so far: wall seconds, seconds per category, goodput fraction."""
        wall = self._last - self._t0
        return {"started_at": self.started_at, "wall_s": wall, "seconds": dict(self.seconds),
                "goodput": self.seconds["step"] / wall if wall > 0 else None, **extra}


def totals(attempts: list[dict]) -> dict:
    wall = sum(a["wall_s"] for a in attempts)
    secs = {c: sum(a["seconds"].get(c, 0.0) for a in attempts) for c in CATEGORIES}
    return {"wall_s": wall, "seconds": secs, "goodput": secs["step"] / wall if wall > 0 else None,
            "attempts": len(attempts)}


def load(run_dir: str | Path) -> dict | None:
    p = Path(run_dir) / FILE
    if not p.exists():
        return None
    return json.loads(p.read_text())


def save(run_dir: str | Path, attempt: dict) -> dict:
    """Write `attempt` into <run>/goodput.json (replacing the entry with its started_at, so the
    snapshots an attempt writes at each checkpoint and at its end stay one entry); returns the file."""
    old = load(run_dir) or {}
    attempts = [a for a in old.get("attempts", []) if a.get("started_at") != attempt["started_at"]] + [attempt]
    doc = {"attempts": attempts, "total": totals(attempts)}
    # Still atomic, but no fsync: the accounting is not worth a disk flush, and the final save runs after
    # the attempt's last lap, so its time is the one thing goodput cannot charge (an fsync on a busy disk
    # took ~0.1 s, 2% of a short run).
    atomic_write_json(Path(run_dir) / FILE, doc, fsync=False)
    return doc


def describe(summary: dict) -> str:
    """One line: goodput share, then the non-zero categories, largest first."""
    wall, secs = summary["wall_s"], summary["seconds"]
    parts = [f"{c} {s:.1f} s" for c, s in sorted(secs.items(), key=lambda kv: -kv[1]) if s >= 0.05]
    share = "n/a" if summary.get("goodput") is None else f"{100 * summary['goodput']:.1f}%"
    return f"goodput {share} of {wall:.1f} s wall: " + ", ".join(parts)

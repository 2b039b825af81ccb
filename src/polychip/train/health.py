"""Stop a run whose numbers have gone non-finite, before it overwrites good checkpoints.

A NaN or inf loss or gradient norm never recovers under AdamW (the moments become NaN and every
later update with them), so training on only burns time and, worse, the next checkpoint would
replace a good one with NaN weights. The loop calls `check_finite` on each step's metrics before
it saves; the exception skips the save, so the last good checkpoint stays the newest one.
"""
from __future__ import annotations

import math
from typing import Any, Mapping


class NonFiniteError(RuntimeError):
    """The loss or gradient norm became NaN/inf (the CLI prints this on one line and exits 2)."""


#: Metrics that must stay finite for the run to be worth continuing.
WATCHED = ("loss", "grad_norm")


def check_finite(step: int, metrics: Mapping[str, Any], last_checkpoint: int | None = None) -> None:
    """Raise NonFiniteError naming the step and metric if any WATCHED metric is NaN or inf."""
    bad = {k: float(metrics[k]) for k in WATCHED if k in metrics and not math.isfinite(float(metrics[k]))}
    if not bad:
        return
    what = ", ".join(f"{k} {v}" for k, v in bad.items())
    kept = (f"the last good checkpoint (step {last_checkpoint}) is kept" if last_checkpoint is not None
            else "no checkpoint was written from the diverged state")
    raise NonFiniteError(f"step {step}: {what}; training stopped and {kept}. Lower train.lr, raise "
                         "train.warmup_steps or set train.grad_clip, then rerun to resume")

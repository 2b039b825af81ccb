"""TensorBoard event files in the run folder, written with tensorboardX (no TensorFlow needed).

`tensorboard --logdir runs/` then shows each run folder under runs/ as one run. Only process 0
writes. A resumed run passes `purge_step` = its first step: TensorBoard hides what earlier attempts
logged from that step on, so steps recomputed after a restart are not drawn twice.
"""
from __future__ import annotations

import sys
from pathlib import Path

#: metrics.jsonl key -> TensorBoard tag.
TAGS = {
    "loss": "train/loss",
    "grad_norm": "train/grad_norm",
    "lr": "train/lr",
    "eval_loss": "eval/loss",
    "tokens_per_s": "perf/tokens_per_s",
    "mfu": "perf/mfu",
    "step_time_s": "perf/step_time_s",
    "mem_bytes_in_use": "memory/bytes_in_use",
    "mem_peak_bytes_in_use": "memory/peak_bytes_in_use",
    "mem_bytes_limit": "memory/bytes_limit",
}


def _summary_writer_class():
    # tensorboardX imports torch at import time when torch is installed (seconds and hundreds of MB,
    # for nothing a JAX run uses): hide it during the import unless something already loaded it.
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            sys.modules.pop("torch", None)
    return SummaryWriter


class TensorBoard:
    """Scalars and text into <out_dir>/events.out.tfevents.*; every method is a no-op when disabled."""

    def __init__(self, out_dir: str | Path | None, enabled: bool = True, purge_step: int | None = None, log=print):
        self._w = None
        if not (enabled and out_dir):
            return
        try:
            writer = _summary_writer_class()
        except ImportError:
            log("note: tensorboardX is not installed, so no TensorBoard events are written "
                "(pip install tensorboardX==2.6.5, or set train.tensorboard=false to silence this)")
            return
        self._w = writer(logdir=str(out_dir), purge_step=purge_step, flush_secs=10)

    @property
    def enabled(self) -> bool:
        return self._w is not None

    def record(self, step: int, row: dict) -> None:
        """The metrics.jsonl keys of `row` that have a tag (None values skipped)."""
        self.scalars(step, {TAGS[k]: v for k, v in row.items() if k in TAGS})

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        if self._w is None:
            return
        for tag, v in values.items():
            if v is not None:
                self._w.add_scalar(tag, float(v), step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self._w is not None:
            self._w.add_text(tag, text, step)

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None

"""Benchmark records: what a chip actually did on a workload, read by the performance model.

A record is one JSON object (a file may hold one object or a list of them); `--records DIR` reads
every *.json under DIR. `polychip bench` writes `source: measured`, `polychip compile` writes
`source: compiler`; `published` marks figures from others' public write-ups (plan/published.py).

    {
      "chip": "h100",                 # catalog name or alias ("cpu" for the host CPU)
      "model": "llama3-8b",           # preset name, or a mapping of ModelConfig fields
      "mode": "train",                # train | serve
      "chips": 8,                     # chips the figure was taken on
      "batch": 32,                    # train: global batch in sequences; serve: decode batch (null: max that fits)
      "seq": 4096,                    # train: tokens per sequence
      "step_time_s": 0.81,            # train: seconds per optimiser step
      "tokens_per_s": 161000,         # train: tokens/s over all chips (step_time_s is derived from it if absent)
      "remat": "full",                # train: a config.REMAT_POLICIES name
      "layout": {"fsdp": 8, "tensor": 1, "stage": 1, "data": 1, "context": 1, "nodes": 1},
                                      # train, optional: the degrees it ran with (`mesh`, as `compile`
                                      # writes it, is read the same way); absent: the planner's best guess
      "grad_accum": 1,                # train, optional: micro-batches per step
      "param_dtype": "float32",       # train, optional: master weight dtype (AdamW state is fp32 either way)
      "prompt_tokens": 1800, "output_tokens": 128,   # serve
      "requests_per_s": 10.8,         # serve: sustained requests/s of one replica of `chips` chips
      "dtype": "bfloat16",
      "source": "measured",           # measured | compiler | published
      "ref": "where the figure came from", "date": "2026-09-01", "notes": "..."
    }
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polychip.config import MODEL_PRESETS, REMAT_POLICIES, ConfigError, ModelConfig, RematPolicy, from_dict
from polychip.estimate.analytic import Layout
from polychip.files import atomic_write_json
from polychip.plan.errors import PlanError

SOURCES = ("measured", "compiler", "published")


@dataclass(frozen=True)
class Record:
    chip: str
    model: ModelConfig
    model_name: str
    mode: str
    chips: int
    source: str
    batch: int | None = None
    seq: int | None = None
    step_time_s: float | None = None
    remat: str = "none"
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    requests_per_s: float | None = None
    dtype: str = "bfloat16"
    ref: str = ""
    notes: str = ""
    #: train: the parallel layout it ran with (None: unknown, the planner picks its best).
    layout: Layout | None = None
    grad_accum: int | None = None
    #: train: a policy not in config.REMAT_POLICIES (a published run's custom one); `remat` names the nearest.
    remat_policy: RematPolicy | None = None
    param_dtype: str = "float32"

    @property
    def tokens_per_s(self) -> float | None:
        if self.mode == "train" and self.step_time_s:
            return self.batch * self.seq / self.step_time_s
        return None

    def to_json(self) -> dict:
        from polychip.config import to_dict

        d = {k: getattr(self, k) for k in ("chip", "mode", "chips", "batch", "seq", "step_time_s", "remat",
                                           "prompt_tokens", "output_tokens", "requests_per_s", "dtype", "source",
                                           "ref", "notes")}
        d["model"] = self.model_name if self.model_name in MODEL_PRESETS else to_dict(self.model)
        if self.layout is not None:
            d["layout"] = {k: getattr(self.layout, k) for k in _LAYOUT_KEYS}
        if self.mode == "train":
            d["grad_accum"], d["param_dtype"] = self.grad_accum, self.param_dtype
        return {k: v for k, v in d.items() if v is not None and v != ""}


def _model(value: Any, where: str) -> tuple[ModelConfig, str]:
    if isinstance(value, str):
        if value not in MODEL_PRESETS:
            raise PlanError(f"{where}: unknown model preset {value!r}; presets: {', '.join(MODEL_PRESETS)}")
        return MODEL_PRESETS[value], value
    if isinstance(value, dict):
        try:
            return from_dict(ModelConfig, value, "model"), "custom"
        except ConfigError as e:
            raise PlanError(f"{where}: {e}") from None
    raise PlanError(f"{where}: field model must be a preset name or a mapping, got {value!r}")


def _num(d: dict, key: str, where: str, integer: bool = False, required: bool = False):
    v = d.get(key)
    if v is None:
        if required:
            raise PlanError(f"{where}: missing field {key!r}")
        return None
    # JSON admits NaN and Infinity; neither is a measurement.
    if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0
            or (integer and v != int(v))):
        raise PlanError(f"{where}: field {key} must be a positive {'integer' if integer else 'number'}, got {v!r}")
    return int(v) if integer else float(v)


_LAYOUT_KEYS = ("data", "fsdp", "tensor", "stage", "context", "nodes", "virtual", "zero1")
#: `polychip compile` writes its mesh axis sizes; these name the same degrees (expert must be 1).
_MESH_KEYS = {"data": "data", "fsdp": "fsdp", "tensor": "tensor", "stage": "stage", "context": "context"}


def _layout(d: dict, where: str) -> Layout | None:
    if "layout" in d:
        raw, keys = d["layout"], _LAYOUT_KEYS
    elif "mesh" in d:
        raw, keys = d["mesh"], tuple(_MESH_KEYS) + ("expert",)
    else:
        return None
    if not isinstance(raw, dict) or any(k not in keys for k in raw):
        raise PlanError(f"{where}: field layout must map some of {', '.join(keys)} to degrees, got {raw!r}")
    vals = {}
    for k, v in raw.items():
        if k == "zero1":
            vals[k] = bool(v)
        elif isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PlanError(f"{where}: layout degree {k} must be a positive integer, got {v!r}")
        elif k == "expert":
            if v != 1:
                raise PlanError(f"{where}: the planner models dense models only (expert degree {v})")
        else:
            vals[k] = v
    return Layout(**vals)


def parse_record(d: Any, where: str = "<record>") -> Record:
    """One record from a JSON object. Raises PlanError naming `where` and the field."""
    from polychip.hardware import HardwareError, get_chip

    if not isinstance(d, dict):
        raise PlanError(f"{where}: a record must be a JSON object, got {type(d).__name__}")
    for key in ("chip", "model", "mode", "chips", "source"):
        if key not in d:
            raise PlanError(f"{where}: missing field {key!r}")
    chip = str(d["chip"])
    if chip != "cpu":
        try:
            chip = get_chip(chip).name
        except HardwareError as e:
            raise PlanError(f"{where}: field chip: {e}") from None
    mode = d["mode"]
    if mode not in ("train", "serve"):
        raise PlanError(f"{where}: field mode must be train or serve, got {mode!r}")
    if d["source"] not in SOURCES:
        raise PlanError(f"{where}: field source must be one of {', '.join(SOURCES)}, got {d['source']!r}")
    model, mname = _model(d["model"], where)
    chips = _num(d, "chips", where, integer=True, required=True)
    if mode == "train":
        batch = _num(d, "batch", where, integer=True, required=True)
        seq = _num(d, "seq", where, integer=True, required=True)
        step = _num(d, "step_time_s", where)
        tps = _num(d, "tokens_per_s", where)
        if step is None and tps is None:
            raise PlanError(f"{where}: a train record needs step_time_s or tokens_per_s")
        if step is None:
            step = batch * seq / tps
        remat = d.get("remat", "none")
        if remat not in REMAT_POLICIES:
            raise PlanError(f"{where}: field remat must be one of {', '.join(REMAT_POLICIES)}, got {remat!r}")
        pd = d.get("param_dtype", "float32")
        if pd not in ("float32", "bfloat16"):
            raise PlanError(f"{where}: field param_dtype must be float32 or bfloat16, got {pd!r}")
        return Record(chip, model, mname, mode, chips, d["source"], batch=batch, seq=seq, step_time_s=step,
                      remat=remat, dtype=str(d.get("dtype", "bfloat16")), ref=str(d.get("ref", "")),
                      notes=str(d.get("notes", "")), layout=_layout(d, where),
                      grad_accum=_num(d, "grad_accum", where, integer=True), param_dtype=pd)
    return Record(chip, model, mname, mode, chips, d["source"], batch=_num(d, "batch", where, integer=True),
                  prompt_tokens=_num(d, "prompt_tokens", where, integer=True, required=True),
                  output_tokens=_num(d, "output_tokens", where, integer=True, required=True),
                  requests_per_s=_num(d, "requests_per_s", where, required=True),
                  dtype=str(d.get("dtype", "bfloat16")), ref=str(d.get("ref", "")), notes=str(d.get("notes", "")))


def load_records(folder: str | Path) -> list[Record]:
    """Every record in every *.json under `folder` (recursively), in path order."""
    root = Path(folder)
    if not root.is_dir():
        raise PlanError(f"records folder {str(root)!r} not found")
    out: list[Record] = []
    for path in sorted(root.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise PlanError(f"{path}: not valid JSON ({e})") from None
        items = data if isinstance(data, list) else [data]
        for i, item in enumerate(items):
            out.append(parse_record(item, f"{path}" + (f"[{i}]" if isinstance(data, list) else "")))
    return out


def write_record(rec: Record | dict, path: str | Path) -> None:
    """Write one record atomically."""
    body = rec.to_json() if isinstance(rec, Record) else rec
    atomic_write_json(path, body, sort_keys=False)

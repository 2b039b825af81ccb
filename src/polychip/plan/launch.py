"""Launch specs: one SkyPilot task YAML per placement, running the polychip command for it.

Accelerator names follow SkyPilot's catalog (`sky show-gpus -a`): GPUs as NAME:COUNT per node,
TPUs as one slice name whose number counts TensorCores for v4/v5p (2 per chip) and chips for
v5e/v6e. tpu7x, Trainium and Inferentia names are not in the SkyPilot listing we could check, so
those specs say so in a comment. Slices larger than one pod need multislice, which is not
expressed here (the comment says so).
"""
from __future__ import annotations

import math
from pathlib import Path

import yaml

from polychip.files import atomic_write
from polychip.config import MODEL_PRESETS, to_dict
from polychip.plan.fleet import Fleet, TrainWorkload
from polychip.plan.solve import Placement, Plan

_GPU = {"h100": "H100", "h200": "H200", "b200": "B200", "gb200": "GB200"}
_AWS = {"trn1": "Trainium", "trn2": "Trainium2", "trn3": "Trainium3", "inf2": "Inferentia2"}
_CLOUD = {"gcp": "gcp", "google": "gcp", "aws": "aws", "azure": "azure", "lambda": "lambda", "oci": "oci"}


def accelerator(chip, n: int) -> tuple[str, int, str]:
    """(SkyPilot accelerators value, num_nodes, caveat) for n chips of `chip`."""
    name = chip.name
    if name in ("tpu-v4", "tpu-v5p"):
        return f"{name}-{2 * n}", 1, ""
    if name == "tpu-v5e":
        return f"tpu-v5litepod-{n}", 1, ""
    if name == "tpu-v6e":
        return f"tpu-v6e-{n}", 1, ""
    if name == "tpu7x":
        return f"tpu7x-{n}", 1, "accelerator name for tpu7x not verified against SkyPilot's catalog"
    per = chip.chips_per_host
    nodes = max(1, math.ceil(n / per))
    count = min(n, per)
    caveat = ""
    if name in _AWS:
        caveat = f"accelerator name {_AWS[name]!r} not verified against SkyPilot's catalog"
        return f"{_AWS[name]}:{count}", nodes, caveat
    return f"{_GPU.get(name, name)}:{count}", nodes, caveat


def _model_args(w) -> list[str]:
    if w.model_name in MODEL_PRESETS:
        return ["--preset", w.model_name]
    return [f"model.{k}={v}" for k, v in to_dict(w.model).items() if v is not None and not isinstance(v, dict)]


def _mesh_args(f: dict) -> list[str]:
    """Mesh degrees of the planned layout (fsdp and tensor always; data, stage and context when used)."""
    lay = f.get("layout") or {"fsdp": f["dp"], "tensor": f["tp"]}
    args = [f"mesh.fsdp={lay.get('fsdp', 1)}", f"mesh.tensor={lay.get('tensor', 1)}"]
    return args + [f"mesh.{k}={lay[k]}" for k in ("data", "stage", "context") if lay.get(k, 1) > 1]


def command(w, p: Placement) -> str:
    """The polychip command line for a placement."""
    f = p.figures
    if isinstance(w, TrainWorkload):
        steps = math.ceil(w.tokens / (w.batch * w.seq_len))
        args = ["polychip", "train", *_model_args(w), "--out", f"runs/{w.name}",
                f"train.steps={steps}", f"train.batch_size={w.batch}", f"train.seq_len={w.seq_len}",
                f"train.grad_accum={f['grad_accum']}", f"train.remat={f['remat']}", "train.param_dtype=bfloat16",
                "train.compute_dtype=bfloat16", *_mesh_args(f)]
    else:
        # `polychip serve` loads weights from a run folder or an HF folder; the engine runs one replica
        # per device today (no tensor-parallel serving yet), so a multi-chip replica is not expressible.
        args = ["polychip", "serve", "--checkpoint", f"weights/{w.name}", "--host", "0.0.0.0", "--port", "8000"]
    return " ".join(args)


def task(fleet: Fleet, p: Placement) -> dict:
    w = next(x for x in fleet.workloads if x.name == p.workload)
    pool = fleet.pool(p.pool)
    per_unit = p.chips // p.replicas
    acc, nodes, caveat = accelerator(pool.chip, per_unit)
    res: dict = {"accelerators": acc}
    if pool.cloud and pool.cloud.lower() in _CLOUD:
        res["cloud"] = _CLOUD[pool.cloud.lower()]
    if pool.region:
        res["region"] = pool.region
    if pool.pricing == "reserved":
        res["use_spot"] = False
    t: dict = {"name": f"{p.workload}-{p.pool}", "resources": res, "num_nodes": nodes,
               "run": command(w, p)}
    if p.kind == "serve":
        res["ports"] = 8000
        t["service"] = {"readiness_probe": "/v1/models", "replicas": p.replicas}
    notes = [f"polychip plan: {p.workload} on {p.pool} ({p.chips} x {pool.chip.name}), "
             f"{p.source}: {p.detail}"]
    if caveat:
        notes.append(caveat)
    return {"_comments": notes, **t}


def write_tasks(fleet: Fleet, plan: Plan, folder: str | Path) -> list[Path]:
    """One <workload>-<pool>.yaml per placement under `folder` (written atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for p in plan.placements:
        t = task(fleet, p)
        comments = t.pop("_comments")
        text = "".join(f"# {c}\n" for c in comments) + yaml.safe_dump(t, sort_keys=False)
        path = folder / f"{p.workload}-{p.pool}.yaml"
        atomic_write(path, text)
        out.append(path)
    return out

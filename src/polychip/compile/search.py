"""`--search`: a bounded walk over configurations, ranked fitting-first, fastest-first.

Dimensions (train mode): rematerialisation (none, dots, full), micro-batching (train.grad_accum 1, 2,
4, 8 where the micro-batch still splits over the batch axes), the fsdp x tensor split (tensor 1, 2, 4,
8 where it divides the devices and the KV heads), and the parameter/optimizer-state dtype (float32,
bfloat16). Serve mode varies the mesh only.

The walk is coordinate descent from the asked configuration: try every value of one dimension with
the others held at the best so far, keep the best, move to the next dimension; at most `max_trials`
compiles (each cached on disk, so a repeated search is instant). "Best" = fits, then shortest
estimated step time; among configurations that do not fit, least HBM per chip.
"""
from __future__ import annotations

import dataclasses

from polychip.compile.errors import CompileError
from polychip.compile.run import Request, compile_report, resolve
from polychip.compile.target import fmt_mesh


def _row(req: Request, cand: dict, rep: dict | None, err: str = "") -> dict:
    row = {**cand, "mesh": cand["mesh"], "error": err}
    if rep is not None:
        steps = rep["steps"]
        main = steps[0] if rep["mode"] == "train" else next(s for s in steps if s["name"] == "decode")
        f = main["figures"]
        row.update(fits=bool(rep["fits"]), hbm_used_per_chip=max(s["figures"]["hbm_used_per_chip"]["value"] for s in steps),
                   step_time=f.get("step_time", {}).get("value"), mfu=f.get("mfu", {}).get("value"),
                   source=f.get("step_time", {}).get("source", ""), cached=rep.get("cached", False))
    return row


def _key(row: dict):
    if row.get("error"):
        return (2, 0.0)
    if row["fits"]:
        return (0, row["step_time"] if row["step_time"] is not None else float("inf"))
    return (1, row["hbm_used_per_chip"])


def _request(base: Request, cand: dict) -> Request:
    ov = [o for o in base.overrides if not o.split("=")[0] in ("train.remat", "train.grad_accum", "train.param_dtype")]
    ov += [f"train.remat={cand['remat']}", f"train.grad_accum={cand['grad_accum']}",
           f"train.param_dtype={cand['param_dtype']}"]
    return dataclasses.replace(base, mesh=cand["mesh"], overrides=tuple(ov))


def search(base: Request, max_trials: int = 12, show_progress: bool = False, on_row=None) -> list[dict]:
    """Evaluate up to max_trials configurations around `base`; return rows ranked best first."""
    r0 = resolve(base)  # bad input fails here, before any compile
    cfg, n_dev = r0.cfg, r0.spec.n_devices
    start = {"mesh": fmt_mesh(r0.sizes), "remat": cfg.train.remat, "grad_accum": cfg.train.grad_accum,
             "param_dtype": cfg.train.param_dtype}
    tensors = [t for t in (1, 2, 4, 8) if n_dev % t == 0 and cfg.model.n_kv_heads % t == 0]
    data = r0.sizes["data"]
    dims = {
        "remat": ["none", "dots", "full"],
        "grad_accum": [a for a in (1, 2, 4, 8) if r0.batch % a == 0],
        "mesh": [fmt_mesh({"data": data, "fsdp": n_dev // data // t, "tensor": t}) for t in tensors
                 if (n_dev // data) % t == 0],
        "param_dtype": ["float32", "bfloat16"],
    }
    if base.mode == "serve":
        dims = {"mesh": dims["mesh"]}
    seen: dict[tuple, dict] = {}

    def evaluate(cand: dict) -> dict | None:
        k = tuple(sorted(cand.items()))
        if k in seen:
            return seen[k]
        if sum(1 for r in seen.values() if not r.get("error")) >= max_trials:
            return None
        try:
            rep = compile_report(_request(base, cand), show_progress=show_progress)
            row = _row(base, cand, rep)
        except CompileError as e:
            row = _row(base, cand, None, str(e))
        seen[k] = row
        if on_row:
            on_row(row)
        return row

    best = evaluate(start)
    for dim, values in dims.items():
        for v in values:
            row = evaluate({**best_cand(best, start), dim: v})
            if row is not None and _key(row) < _key(best):
                best = row
    return sorted(seen.values(), key=_key)


def best_cand(row: dict, start: dict) -> dict:
    return {k: row.get(k, start[k]) for k in start}

"""`--search`: a bounded walk over configurations, ranked fitting-first, fastest-first.

Dimensions (train mode): rematerialisation (every policy in config.REMAT_POLICIES), micro-batching
(train.grad_accum 1, 2, 4, 8 where the micro-batch still splits over the batch axes), the fsdp x tensor
split (tensor 1, 2, 4, 8 where it divides the devices and the KV heads), pipeline stages on TPU targets
(mesh stage 2, 4, 8 where it divides both the layer count and the devices), and the parameter /
optimizer-state dtype (float32, bfloat16). Serve mode varies the mesh only. A configuration that cannot
be lowered (pipeline stages while the pipelined step is not built yet, a remat policy the model does not
implement) is a row "not lowered: reason", never a crash.

The walk is coordinate descent from the asked configuration: try every value of one dimension with
the others held at the best so far, keep the best, move to the next dimension; at most `max_trials`
compiles (each cached on disk, so a repeated search is instant). "Best" = fits, then shortest
estimated step time (polychip.estimate over the compiled program); among configurations that do not
fit, least HBM per chip. `why` says in one line why the winner won.
"""
from __future__ import annotations

import dataclasses

from polychip.compile.display import fmt_value
from polychip.compile.errors import CompileError
from polychip.compile.run import Request, compile_report, resolve
from polychip.compile.target import fmt_mesh
from polychip.config import REMAT_POLICIES


def _row(req: Request, cand: dict, rep: dict | None, err: str = "") -> dict:
    row = {**cand, "mesh": cand["mesh"], "error": err}
    if rep is not None:
        steps = rep["steps"]
        main = steps[0] if rep["mode"] == "train" else next(s for s in steps if s["name"] == "decode")
        f = main["figures"]
        note = f.get("step_time", {}).get("note", "")
        row.update(fits=bool(rep["fits"]), hbm_used_per_chip=max(s["figures"]["hbm_used_per_chip"]["value"] for s in steps),
                   step_time=f.get("step_time", {}).get("value"), mfu=f.get("mfu", {}).get("value"),
                   mfu_figure=f.get("mfu"), bound=note.split("-bound")[0] if "-bound" in note else "",
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
    cfg = r0.cfg
    start = {"mesh": fmt_mesh(r0.sizes), "remat": cfg.train.remat, "grad_accum": cfg.train.grad_accum,
             "param_dtype": cfg.train.param_dtype}
    dims = {
        "remat": list(REMAT_POLICIES),
        "grad_accum": [a for a in (1, 2, 4, 8) if r0.batch % a == 0],
        "mesh": _meshes(r0, with_stages=r0.spec.kind == "tpu" and base.mode == "train"),
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
            row = _row(base, cand, None, f"not lowered: {e}" if "stage=" in cand["mesh"] else str(e))
        except Exception as e:  # noqa: BLE001 - a candidate the step builder cannot lower is a result, not a crash
            first = (str(e).strip().splitlines() or [""])[0]
            row = _row(base, cand, None, f"not lowered: {type(e).__name__}: {first}")
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


def _meshes(r0, with_stages: bool) -> list[str]:
    """fsdp x tensor splits at the asked data degree, and (with_stages) pipeline stages that divide the
    layers and the devices, with the rest on fsdp."""
    cfg, n_dev, data = r0.cfg, r0.spec.n_devices, r0.sizes["data"]
    tensors = [t for t in (1, 2, 4, 8) if n_dev % t == 0 and cfg.model.n_kv_heads % t == 0]
    out = [fmt_mesh({"data": data, "fsdp": n_dev // data // t, "tensor": t}) for t in tensors
           if (n_dev // data) % t == 0]
    if with_stages:
        t = r0.sizes["tensor"]
        out += [fmt_mesh({"data": data, "stage": st, "fsdp": n_dev // data // st // t, "tensor": t})
                for st in (2, 4, 8) if cfg.model.n_layers % st == 0 and (n_dev // data // t) % st == 0]
    return out


def _desc(row: dict) -> str:
    return f"mesh {row['mesh']}, remat {row['remat']}, grad_accum {row['grad_accum']}, params {row['param_dtype']}"


def why(rows: list[dict]) -> str:
    """One line: why the first of the ranked rows won (fits, step time against the runner-up, bound)."""
    ok = [r for r in rows if not r.get("error")]
    if not ok:
        return "no configuration compiled: " + (rows[0]["error"] if rows else "nothing tried")
    win = ok[0]
    if not win["fits"]:
        return f"nothing fits; least HBM per chip: {_desc(win)} ({fmt_value(win['hbm_used_per_chip'], 'B')})"
    head = f"winner {_desc(win)}: fits ({fmt_value(win['hbm_used_per_chip'], 'B')} per chip)"
    t = win["step_time"]
    runner = next((r for r in ok[1:] if r["fits"]), None)
    if t is None:
        return head + ", no step-time estimate"
    bound = f", {win['bound']}-bound" if win.get("bound") else ""
    if runner is None or runner["step_time"] is None:
        return head + f", est. step {fmt_value(t, 's')}{bound}; the only fitting configuration"
    gain = runner["step_time"] / t - 1
    return (head + f", est. step {fmt_value(t, 's')} vs {fmt_value(runner['step_time'], 's')} for the runner-up "
            f"({_desc(runner)}; {100 * gain:.1f}% slower){bound}")

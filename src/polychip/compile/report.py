"""Turn compiled steps (or the analytic roofline) into a report whose every figure names its source.

Sources:
- "compiled":          read from the compiled executable (memory_analysis, the optimised HLO's shapes).
- "compiler-estimate": XLA's own cost_analysis (per device; it counts each while-loop body once).
- "program":           matmul FLOPs of the traced step (jaxpr), scan trip counts included (program_flops.py).
- "model":             our formulas and the chip catalog (polychip.model.flops, hardware/catalog.yaml).
- "estimate":          polychip.estimate over the compiled program's ops (estimate/hlo.py): per fusion /
                       custom call max(FLOPs / peak, bytes / HBM bandwidth), Pallas kernels at their
                       declared cost, collectives over the link they cross, loop trips applied, summed
                       under the calibration's overlap rule. Printed with the calibration's validated
                       error band; uncalibrated (no band), the MFU is printed only as an upper bound.
- "modelled":          GPU / Trainium targets: no compiler here. Training: the analytic op list
                       (estimate.analytic) priced by the same estimator and the planner's calibration
                       (figures "estimate", as `plan` gives them); serving: polychip.plan.roofline.

Step time: XLA's `optimal_seconds` is shown raw, as its own row, but cannot be the step time for these
programs: it covers each loop body once (one layer of a scanned model) and comes back negative for large
modules (seen for llama3-8b on v6e:16x16). The "estimate" rows are used for tokens/s and MFU instead.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from polychip.compile import hlo as hlo_mod
from polychip.compile.display import fmt_value
from polychip.compile.lower import CompiledStep
from polychip.compile.target import TargetSpec, fmt_mesh
from polychip.config import Config
from polychip.estimate import INTER, INTRA, estimate_step
from polychip.estimate.analytic import machine
from polychip.estimate.ops import HOST
from polychip.estimate.calibration import calibration_for
from polychip.estimate.hlo import opaque_ops
from polychip.model import flops as F

SCHEMA = "polychip.compile/1"


def fig(value: Any, unit: str, source: str, note: str = "") -> dict:
    d = {"value": value, "unit": unit, "source": source}
    if note:
        d["note"] = note
    return d


@dataclass
class StepReport:
    name: str
    figures: dict = field(default_factory=dict)
    fits: bool | None = None
    notes: list = field(default_factory=list)

    def v(self, key: str):
        f = self.figures.get(key)
        return None if f is None else f["value"]


def hbm_sum(mem: dict) -> int:
    """Inputs + outputs (donated outputs reuse inputs) + scratch + code: every buffer as if live at once."""
    return mem["argument"] + mem["output"] - mem["alias"] + mem["temp"] + mem["generated_code"]


def hbm_used(mem: dict) -> int:
    """HBM an executable needs per device: what the compiler's buffer assignment allocates (lower.assigned_hbm:
    buffers whose lifetimes do not overlap share memory) where it reported it, else `hbm_sum`. The sum can be
    far above it: 116.87 against 96.36 GB per device for the deepseek-v3 step on tpu7x:4x4x8, a program the
    TPU compiler accepted for its 96 GiB."""
    return mem.get("assigned") or hbm_sum(mem)


def model_flops(cfg: Config, step: str, batch: int, seq: int) -> float:
    m = cfg.model
    if step == "train":
        return F.train_flops_per_step(m, batch, seq)
    if step == "prefill":
        return F.forward_flops_per_token(m, seq) * batch * seq
    return F.decode_flops_per_token(m, seq - 1) * batch


def tokens_per_step(step: str, batch: int, seq: int) -> int:
    return batch if step == "decode" else batch * seq


def step_report(c: CompiledStep, cfg: Config, spec: TargetSpec, batch: int, seq: int, dtype: str) -> StepReport:
    r = StepReport(c.name)
    _memory_figures(r, c, spec)
    mf = model_flops(cfg, c.name, batch, seq)
    _flops_figures(r, c, mf, spec.n_devices)
    if c.oom:
        r.figures["compile_time"] = fig(c.lower_s + c.compile_s, "s", "compiled", "until the compiler refused")
        return r
    _estimate_figures(r, c, spec, mf, tokens_per_step(c.name, batch, seq), dtype)
    r.figures["compile_time"] = fig(c.lower_s + c.compile_s, "s", "compiled",
                                    f"lower {c.lower_s:.1f} s + compile {c.compile_s:.1f} s")
    _compile_notes(r, c)
    return r


def _memory_figures(r: StepReport, c: CompiledStep, spec: TargetSpec) -> None:
    """HBM per device and per chip, and whether it fits the catalog's capacity (sets r.fits)."""
    chip, dpc = spec.chip, spec.devices_per_chip
    f, mem = r.figures, c.memory
    if c.oom:
        # The compiler refused (temporaries alone exceed HBM): arguments from the shardings, temporaries
        # from its message; outputs/code unknown, so "used" is a lower bound.
        f["argument_bytes_per_device"] = fig(mem["argument"], "B", "compiled", "per-device shard sizes of the inputs")
        f["temp_bytes_per_device"] = fig(mem["temp"], "B", "compiled", "from the compiler's out-of-memory message")
        f["compiler_available_hbm_per_device"] = fig(mem["compiler_available_hbm"], "B", "compiled",
                                                     "usable HBM per device as the compiler counts it")
        used = mem["argument"] + mem["temp"]
        f["hbm_used_per_device"] = fig(used, "B", "compiled", "at least: arguments + temporaries")
        r.notes.append(f"the TPU compiler refused: {c.oom}")
    else:
        for k in ("argument", "output", "alias", "temp", "generated_code"):
            f[f"{k}_bytes_per_device"] = fig(mem[k], "B", "compiled")
        used = hbm_used(mem)
        f["hbm_used_per_device"] = fig(used, "B", "compiled", "the compiler's buffer assignment (HBM)"
                                       if mem.get("assigned") else "argument + output - alias + temp + generated code")
        if mem.get("assigned"):
            f["hbm_sum_per_device"] = fig(hbm_sum(mem), "B", "compiled",
                                          "argument + output - alias + temp + code, as if all live at once")
    f["hbm_used_per_chip"] = fig(used * dpc, "B", "compiled", f"{dpc} device(s) per chip" if dpc > 1 else "")
    cap = spec.hbm_per_device
    if cap is not None:
        f["hbm_per_device"] = fig(cap, "B", "model", f"catalog: {chip.name} {chip.hbm_bytes / 1e9:.1f} GB per chip"
                                  + (f" / {dpc} devices" if dpc > 1 else ""))
        r.fits = used <= cap
        f["hbm_margin_per_device"] = fig(cap - used, "B", "compiled", "spare" if r.fits else "negative: does not fit")


def _flops_figures(r: StepReport, c: CompiledStep, mf: float, n_dev: int) -> None:
    """Model FLOPs, the traced program's FLOPs, and XLA's own cost_analysis beside them."""
    f = r.figures
    f["model_flops"] = fig(mf, "FLOP", "model", "polychip.model.flops, all devices")
    f["program_flops"] = fig(c.program_flops, "FLOP", "program", "matmuls of the traced step incl. remat and "
                             "masked attention work, + Pallas kernels' declared cost, all devices")
    f["program_flops_per_device"] = fig(c.program_flops / n_dev, "FLOP", "program")
    if c.opaque_kernel_calls:
        r.notes.append(f"program FLOPs leave out {c.opaque_kernel_calls} Pallas kernel call site(s) (custom calls; "
                       "their matmuls are not visible in the jaxpr), so they undercount and the compute time is low")
    if "flops" in c.cost:
        f["compiler_flops_per_device"] = fig(c.cost["flops"], "FLOP", "compiler-estimate",
                                             "cost_analysis: per device, each loop body counted once")
        f["program_flops_loops_once_per_device"] = fig(c.program_flops_loops_once / n_dev, "FLOP", "program",
                                                       "the traced count with loops once: compare with the compiler's")
    if "optimal_seconds" in c.cost:
        os_ = c.cost["optimal_seconds"]
        f["compiler_optimal_seconds"] = fig(os_, "s", "compiler-estimate",
                                            "invalid (negative)" if os_ <= 0 else
                                            ("loop bodies counted once" if c.hlo["loops"] else ""))
    if "bytes accessed" in c.cost:
        f["compiler_bytes_accessed_per_device"] = fig(c.cost["bytes accessed"], "B", "compiler-estimate",
                                                      "each loop body counted once")


#: How reports name the estimator's links.
LINK_NAMES = {INTRA: "within a slice (ICI)", INTER: "across slices (DCN)", HOST: "to / from host memory (PCIe)"}


def band_text(band: float | None) -> str:
    return "uncalibrated: no error band" if band is None else f"validated error band +/-{band:.0%}"


def mfu_figure(mf: float, t_step: float, t_optimistic: float, chips: int, peak: float, band: float | None,
               source: str = "estimate") -> tuple[dict, str]:
    """The MFU figure a report may print, and a note when a figure had to be clamped to 100%.

    Calibrated: the estimate with the range its band allows, mfu x (1 -/+ band) (the band is the fit's
    relative MFU error). Uncalibrated: only an upper bound, from `t_optimistic` (every op at peak, every
    collective hidden), with the word "upper bound"; `value` is that bound. No printed figure exceeds 100%.
    """
    est = F.mfu(mf, t_step, chips, peak)
    note = ""
    if band is None:
        ub = F.mfu(mf, t_optimistic, chips, peak)
        exposed = "" if t_optimistic == t_step else \
            f" (collectives hidden; {100 * min(est, 1.0):.1f}% with them exposed)"
        f = fig(min(ub, 1.0), "", source, "uncalibrated: no error band; upper bound" + exposed)
        f["upper_bound"] = True
        top = ub
    else:
        lo, hi = est * (1 - band), est * (1 + band)
        f = fig(min(est, 1.0), "", source, band_text(band))
        f["range"] = [min(lo, 1.0), min(hi, 1.0)]
        top = hi
    if top > 1.0:
        note = (f"MFU clamped to 100% (computed {100 * top:.0f}%): the model FLOPs exceed what the program's ops "
                "were costed at, so some work is invisible to the walk")
    return f, note


def _costable(ops: list, m) -> tuple[list, dict]:
    """Ops the machine can cost, and bytes per link of collectives left out for want of a catalog bandwidth."""
    bw = {INTRA: m.intra_bandwidth, INTER: m.inter_bandwidth, HOST: m.host_bandwidth}
    keep, dropped = [], defaultdict(float)
    for o in ops:
        if o.kind == "collective" and not bw.get(o.link or INTRA):
            dropped[o.link or INTRA] += o.bytes * o.count
        else:
            keep.append(o)
    return keep, dict(dropped)


def _traffic_figures(r: StepReport, h: dict) -> None:
    f = r.figures
    f["hbm_traffic_per_device"] = fig(h["hbm_traffic_bytes"], "B", "compiled", "HLO walk, loop trips included; "
                                      "dynamic-(update-)slices charged for the slice, Pallas kernels as declared")
    f["collective_bytes_per_device"] = fig(sum(h["collective_bytes"].values()), "B", "compiled", ", ".join(
        f"{k} {fmt_value(v, 'B')}" for k, v in sorted(h["collective_bytes"].items())))
    dcn = h.get("dcn_collective_bytes") or {}
    if dcn:
        f["dcn_collective_bytes_per_device"] = fig(sum(dcn.values()), "B", "compiled", ", ".join(
            f"{k} {fmt_value(v, 'B')}" for k, v in sorted(dcn.items())))


def _estimate_figures(r: StepReport, c: CompiledStep, spec: TargetSpec, mf: float, tokens: int, dtype: str) -> None:
    """Traffic and collectives from the compiled HLO, and the estimator's step time over its ops."""
    _traffic_figures(r, c.hlo)
    ops = hlo_mod.ops_of(c.hlo)
    if not ops:
        return
    try:
        m = machine(spec.chip, dtype)  # the planner's machine: the catalog figures plus the host link
    except ValueError as e:
        r.notes.append(f"no step-time estimate: {e}")
        return
    ops, dropped = _costable(ops, m)
    for link, b in dropped.items():
        what = {INTRA: "link", INTER: "scale-out", HOST: "host"}[link]
        r.notes.append(f"{b / 1e9:.2f} GB of transfers {LINK_NAMES[link]} not costed: the catalog has no "
                       f"{what} bandwidth for {spec.chip.name}")
    opaque = opaque_ops(ops)
    if opaque:
        names = sorted({o.name for o in opaque})
        r.notes.append(f"{len(names)} custom call(s) with no declared cost, charged for their HBM bytes only: "
                       + ", ".join(names[:4]) + (" ..." if len(names) > 4 else ""))
    cal = calibration_for(spec.chip.family)
    est = estimate_step(ops, m, cal)
    _estimate_rows(r, est, ops, spec, mf, tokens, dtype, cal)


def _estimate_rows(r: StepReport, est, ops: list, spec: TargetSpec, mf: float, tokens: int, dtype: str, cal) -> None:
    f, chip, t = r.figures, spec.chip, est.t_step
    declared = sum(o.flops * o.count for o in ops if o.source == "declared")
    f["estimate_flops_per_device"] = fig(sum(o.flops * o.count for o in ops), "FLOP", "estimate",
                                         "dots of the compiled HLO + Pallas kernels' declared cost")
    f["declared_flops_per_device"] = fig(declared, "FLOP", "estimate", "the Pallas kernels' pl.CostEstimate")
    f["t_ops"] = fig(est.t_compute, "s", "estimate", f"sum over {sum(o.kind == 'compute' for o in ops)} ops of "
                     f"max(FLOPs / peak, bytes / HBM bandwidth) at the calibration's efficiencies")
    f["t_compute"] = fig(est.t_flops, "s", "estimate", f"of which compute-bound ops; peak: {chip.peak_basis(dtype)}")
    f["t_hbm"] = fig(est.t_memory, "s", "estimate", "of which HBM-bound ops")
    f["t_collectives"] = fig(est.t_collectives, "s", "estimate", ", ".join(
        f"{LINK_NAMES[k]} {v * 1e3:.3g} ms" for k, v in sorted(est.by_link.items())) or "none")
    share = est.t_exposed_collectives / est.t_collectives if est.t_collectives else 0.0
    exposed = {k: v * share for k, v in est.by_link.items()}
    f["t_exposed_collectives"] = fig(est.t_exposed_collectives, "s", "estimate",
                                     f"after {cal.overlap:.0%} of op time hides collectives (shared pro rata): "
                                     + (", ".join(f"{LINK_NAMES[k]} {v * 1e3:.3g} ms" for k, v in sorted(exposed.items()))
                                        or "none"))
    f["exposed_collectives_by_link"] = fig(exposed, "s", "estimate")
    f["step_time"] = fig(t, "s", "estimate", f"{est.bound}-bound, sum over ops ({band_text(est.band)})")
    f["tokens_per_s_per_chip"] = fig(tokens / t / spec.n_chips, "tok/s", "estimate", band_text(est.band))
    mfu, note = mfu_figure(mf, t, max(est.t_compute, est.t_collectives), spec.n_chips, chip.peak(dtype), est.band)
    f["mfu"] = mfu
    if note:
        r.notes.append(note)
    f["top_ops"] = fig([[n, s] for n, s in est.top_ops], "ops", "estimate", "largest contributors, s per step")


def _compile_notes(r: StepReport, c: CompiledStep) -> None:
    """What the reader must know to trust the figures: kernel swaps, dropped sharding rules, loop counting."""
    if c.kernel_fallback:
        r.notes.append(c.kernel_fallback)
    if c.dropped_rules:
        r.notes.append(f"{len(c.dropped_rules)} sharding rule(s) dropped (axis does not divide): "
                       + "; ".join(c.dropped_rules[:3]))
    if c.hlo["loops"]:
        trips = ", ".join(str(t) for _, t in c.hlo["loops"])
        r.notes.append(f"compiled loops with trip counts {trips}: XLA's cost_analysis counts each body once")


def modelled_train(cfg: Config, spec: TargetSpec, sizes: dict, batch: int, seq: int, dtype: str) -> StepReport:
    """GPU / Trainium training: the analytic op list of this configuration (estimate.analytic.train_ops, the
    mesh as its layout) priced by the estimator with the planner's calibration for the chip: the step time
    `plan` gives the same configuration (plan.search.price)."""
    from polychip.estimate import analytic as A
    from polychip.hardware import load_catalog
    from polychip.plan import calibrate as PC
    from polychip.plan import search as S
    from polychip.plan.published import published_records

    chip, n, t = spec.chip, spec.n_chips, cfg.train
    lay = A.Layout(data=sizes.get("data", 1) * sizes.get("expert", 1), fsdp=sizes.get("fsdp", 1),
                   tensor=sizes.get("tensor", 1), stage=sizes.get("stage", 1), context=sizes.get("context", 1),
                   nodes=S.nodes_for(chip, n))
    cal = PC.fit(published_records(), load_catalog()).for_chip(chip)
    r = StepReport("train")
    try:
        c = S.price(cfg.model, chip, lay, batch, seq, t.remat, t.grad_accum, cal, param_dtype=t.param_dtype)
    except (A.LayoutError, ValueError) as e:
        r.fits = False
        r.notes.append(f"no estimate: {e}")
        return r
    r.fits, est, f = c.fits, c.est, r.figures
    room = A.usable_hbm(chip)
    f["hbm_used_per_chip"] = fig(c.hbm_bytes, "B", "modelled", "state + saved activations + one gathered layer")
    f["hbm_per_chip"] = fig(chip.hbm_bytes, "B", "model", "catalog")
    if room is not None:
        f["hbm_margin_per_chip"] = fig(room - c.hbm_bytes, "B", "modelled", "of the usable HBM")
    mf = model_flops(cfg, "train", batch, seq)
    f["model_flops"] = fig(mf, "FLOP", "model")
    f["t_ops"] = fig(est.t_compute, "s", "estimate", "sum over the analytic ops of max(FLOPs / peak, bytes / HBM "
                     "bandwidth) at the calibration's efficiencies")
    f["t_compute"] = fig(est.t_flops, "s", "estimate", f"of which compute-bound ops; peak: {chip.peak_basis(dtype)}")
    f["t_hbm"] = fig(est.t_memory, "s", "estimate", "of which HBM-bound ops")
    f["t_collectives"] = fig(est.t_collectives, "s", "estimate", f"{lay.text()}; exposed "
                             f"{est.t_exposed_collectives * 1e3:.3g} ms after overlap")
    f["step_time"] = fig(est.t_step, "s", "estimate", f"{est.bound}-bound, sum over the analytic op list "
                         f"({band_text(est.band)}; calibration {cal.source})")
    f["tokens_per_s_per_chip"] = fig(batch * seq / est.t_step / n, "tok/s", "estimate", band_text(est.band))
    f["mfu"], note = mfu_figure(mf, est.t_step, max(est.t_compute, est.t_collectives), n, chip.peak(dtype), est.band)
    r.notes += [note] if note else []
    if sizes.get("expert", 1) > 1:
        r.notes.append("the expert axis was modelled as data parallelism (the model is dense)")
    return r


def modelled_reports(cfg: Config, spec: TargetSpec, mode: str, batch: int, seq: int, dtype: str,
                     output_tokens: int, sizes: dict | None = None) -> list[StepReport]:
    """GPU / Trainium: training from the analytic op list (`modelled_train`, as `plan` prices it); serving
    from the planner's roofline (polychip.plan.roofline). `sizes`: the mesh (default: all fsdp)."""
    from polychip.plan import roofline as R

    chip, n = spec.chip, spec.n_chips
    m = cfg.model
    out = []
    if mode == "train":
        out.append(modelled_train(cfg, spec, sizes or {"fsdp": spec.n_devices}, batch, seq, dtype))
    else:
        sb = R.serve_bound(m, chip, n, batch, seq, output_tokens, dtype=dtype)
        for name, t in (("prefill", sb.t_prefill * batch), ("decode", sb.t_decode)):
            r = StepReport(name, fits=sb.fits)
            f = r.figures
            f["hbm_used_per_chip"] = fig(sb.hbm_bytes_needed, "B", "modelled", "weights + KV cache")
            f["hbm_per_chip"] = fig(chip.hbm_bytes, "B", "model")
            mf = model_flops(cfg, name, batch, seq + output_tokens if name == "decode" else seq)
            f["model_flops"] = fig(mf, "FLOP", "model")
            f["step_time"] = fig(t, "s", "modelled", "roofline (optimistic); prefill = batch x one prompt")
            f["tokens_per_s_per_chip"] = fig(tokens_per_step(name, batch, seq) / t / n, "tok/s", "modelled")
            f["mfu"], note = mfu_figure(mf, t, t, n, chip.peak(dtype), None, "modelled")
            r.notes += [note] if note else []
            out.append(r)
    what = "the planner's estimate for this configuration" if mode == "train" else "figures come from published specs"
    for r in out:
        r.notes.append(f"modelled: no compiler for {chip.name} is reachable here; {what}")
    return out


def build(cfg: Config, model_name: str, spec: TargetSpec, sizes: dict, mode: str, batch: int, seq: int,
          steps: list[StepReport], output_tokens: int = 0, cached: bool = False) -> dict:
    """The JSON report."""
    dtype = cfg.train.compute_dtype
    fits = all(s.fits for s in steps if s.fits is not None) if any(s.fits is not None for s in steps) else None
    return {
        "schema": SCHEMA,
        "model": model_name,
        "n_params": cfg.model.n_params,
        "mode": mode,
        "target": {"text": spec.text, "chip": spec.chip.name, "kind": spec.kind, "topology": spec.topology,
                   "num_slices": spec.num_slices, "chips": spec.n_chips, "devices": spec.n_devices,
                   "devices_per_chip": spec.devices_per_chip},
        "mesh": dict(sizes),
        "mesh_text": fmt_mesh(sizes),
        "batch": batch,
        "seq": seq,
        "output_tokens": output_tokens if mode == "serve" else None,
        "grad_accum": cfg.train.grad_accum,
        "remat": cfg.train.remat,
        "param_dtype": cfg.train.param_dtype,
        "compute_dtype": dtype,
        "kernels": {},
        "fits": fits,
        "cached": cached,
        "steps": [{"name": s.name, "fits": s.fits, "figures": s.figures, "notes": s.notes} for s in steps],
    }


def planner_record(rep: dict) -> dict | None:
    """A record polychip.plan.records reads (source "compiler"); None where it cannot express the run."""
    steps = {s["name"]: s for s in rep["steps"]}
    src = "compiler" if rep["target"]["kind"] == "tpu" else None
    if src is None or not rep["fits"]:
        return None
    base = {"chip": rep["target"]["chip"], "model": rep["model"], "mode": rep["mode"], "chips": rep["target"]["chips"],
            "dtype": rep["compute_dtype"], "source": src, "mesh": rep["mesh"],
            "ref": f"polychip compile --target {rep['target']['text']} (estimate over the compiled program's ops)"}
    if rep["mode"] == "train":
        if rep["remat"] not in ("none", "full"):
            return None  # the planner's records know remat none|full only
        st = steps["train"]["figures"]
        t = st["step_time"]["value"]
        return {**base, "batch": rep["batch"], "seq": rep["seq"], "step_time_s": t,
                "tokens_per_s": rep["batch"] * rep["seq"] / t, "remat": rep["remat"],
                "hbm_used_per_chip": st["hbm_used_per_chip"]["value"], "mfu_estimate": st["mfu"]["value"]}
    tp, td = steps["prefill"]["figures"]["step_time"]["value"], steps["decode"]["figures"]["step_time"]["value"]
    out = rep["output_tokens"]
    return {**base, "batch": rep["batch"], "prompt_tokens": rep["seq"], "output_tokens": out,
            "requests_per_s": rep["batch"] / (tp + out * td), "step_time_s": td,
            "hbm_used_per_chip": max(s["figures"]["hbm_used_per_chip"]["value"] for s in rep["steps"])}

"""The optimiser: a mixed-integer program (HiGHS via scipy) over candidate placements (program.py).

Variables: y_o in {0,1} per training option (exactly one per run), z_o in {0..max} replicas per
serving option, and T (the finishing time) for the time objective. Constraints: one option per
run, replicas x requests/s >= each service's rate, chips used <= each pool, summed power <= the
site cap, finish of every run <= T. Objectives: marginal dollars, energy (kWh), or T; a 1e-6
tie-break (list-price dollars, or dollars) picks the thriftiest of equal plans.

When nothing is feasible, the same program is solved again with slack on every constraint (extra
pool chips, extra power, lateness past a deadline, unserved requests, an unplaced run), each slack
normalised by its limit, and the slacks the solver needed are reported: which constraint binds and
by how much. That is one minimal relaxation, not the only one.

Up to `colgen_above` options HiGHS gets the whole MILP (exact to its gap). Larger fleets go through
column generation (program.solve_colgen); the gap it reports is against the LP bound over every
option, so it is a true upper bound on the distance from the optimum.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
from polychip.plan import options as O
from polychip.plan import program as P
from polychip.plan.fleet import Fleet
from polychip.plan.perf import PerfModel, ServeConfig

@dataclass
class Placement(O.Footprint):
    """A chosen option taken `replicas` times (1 for a training run); chips, cost, energy and power are totals."""

    replicas: int = 1
    source: str = ""  # where the performance figures came from (perf model source)
    detail: str = ""
    figures: dict = field(default_factory=dict)
    flags: list = field(default_factory=list)


@dataclass
class Plan:
    objective: str
    status: str  # optimal | feasible | infeasible
    placements: list[Placement]
    cost: float | None = None  # marginal USD (what the objective minimises)
    committed_cost: float = 0.0  # reserved pools for the horizon
    energy_kwh: float = 0.0
    peak_power_w: float = 0.0
    makespan_h: float = 0.0
    solve_s: float = 0.0
    gap: float | None = None
    n_options: int = 0
    #: Seconds spent building candidate options (performance model included); solve_s includes it.
    options_s: float = 0.0
    diagnosis: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def objective_value(self) -> float | None:
        return {"cost": self.cost, "energy": self.energy_kwh, "time": self.makespan_h}[self.objective]

    def to_json(self) -> dict:
        d = asdict(self)
        d["objective_value"] = self.objective_value
        return d


def _coefs(o: O.Option, objective: str) -> tuple[float, float]:
    """(primary, tie-break) objective coefficient of one unit of an option."""
    cost = o.cost if o.cost is not None else 0.0
    if objective == "cost":
        return cost, o.list_cost or 0.0
    if objective == "energy":
        return o.energy_kwh, cost
    return 0.0, cost if o.cost is not None else o.energy_kwh


def _placements(fleet: Fleet, opts, x) -> list[Placement]:
    pools = {p.name: p for p in fleet.pools}
    out = []
    for i, o in enumerate(opts):
        units = int(round(x[i]))
        if units <= 0:
            continue
        p = pools[o.pool]
        flags = []
        if p.power_estimated:
            flags.append(p.power_source)
        if "UNCERTAIN" in p.price_source:
            flags.append(f"price {p.price_source}")
        if p.price_per_hour is None:
            flags.append("no price: cost n/a")
        e = o.est
        if isinstance(e, ServeConfig):
            figures = {"replica_chips": e.k, "decode_batch": e.batch, "ttft_s": e.ttft_s, "tpot_s": e.tpot_s,
                       "requests_per_s_per_replica": e.rps, "requests_per_s": e.rps * units}
        else:
            figures = {"step_time_s": e.step_time_s, "tokens_per_s": e.tokens_per_s, "mfu": e.mfu, "dp": e.dp,
                       "tp": e.tp, "grad_accum": e.grad_accum, "remat": e.remat, "bound": e.bound,
                       "hbm_gb_per_chip": e.hbm_bytes_per_chip / 1e9, "band": getattr(e, "band", None),
                       "layout": None if getattr(e, "layout", None) is None else
                       {k: getattr(e.layout, k) for k in ("data", "fsdp", "tensor", "stage", "context", "nodes")}}
        mul = units

        def scale(v):
            return None if v is None else v * mul

        out.append(Placement(o.workload, o.kind, o.pool, o.chip, o.chips * units, o.start_h, o.finish_h,
                             scale(o.cost), scale(o.list_cost), o.energy_kwh * units, o.power_w * units, o.lateness_h,
                             replicas=units if o.kind == "serve" else 1, source=e.source, detail=e.detail,
                             figures=figures, flags=flags))
    return out


def _totals(plan: Plan, fleet: Fleet) -> None:
    pl = plan.placements
    costs = [p.cost for p in pl]
    plan.cost = None if any(c is None for c in costs) else float(sum(costs))
    plan.energy_kwh = float(sum(p.energy_kwh for p in pl))
    plan.peak_power_w = float(sum(p.power_w for p in pl))
    plan.makespan_h = max([p.finish_h for p in pl if p.kind == "train"] + [0.0])
    plan.committed_cost = float(sum(p.count * p.price_per_hour * fleet.horizon_h for p in fleet.pools
                                    if p.pricing == "reserved" and p.price_per_hour is not None))


def _diagnose(fleet: Fleet, opts, x, slack: dict) -> list[str]:
    msgs = []
    pools = {p.name: p for p in fleet.pools}
    if "sP" in slack and x[slack["sP"]] > 1e-6:
        short = x[slack["sP"]] * fleet.power_cap_w
        msgs.append(f"power cap short by {_mw(short)} (the plan needs {_mw(fleet.power_cap_w + short)} of "
                    f"{_mw(fleet.power_cap_w)}) for the deadlines and services")
    for name, j in slack.items():
        if name.startswith("sp:") and x[j] > 1e-6:
            p = pools[name[3:]]
            extra = int(np.ceil(x[j] * p.count - 1e-6))
            msgs.append(f"pool {p.name} ({p.chip.name}) short by {extra} chips (needs {p.count + extra}, has {p.count})")
    for i, o in enumerate(opts):
        if o.kind == "train" and x[i] > 0.5 and o.lateness_h > 0:
            msgs.append(f"run {o.workload} misses its deadline by {o.lateness_h:.1f} h even on {o.chips} {o.chip} "
                        f"chips in {o.pool}")
    rates = {w.name: getattr(w, "rate", 0.0) for w in fleet.workloads}
    for name, j in slack.items():
        if name.startswith("u:") and x[j] > 0.5:
            msgs.append(f"run {name[2:]} cannot be placed within the pools")
        if name.startswith("v:") and x[j] > 1e-6:
            rate = rates[name[2:]]
            msgs.append(f"service {name[2:]}: only {rate * (1 - x[j]):.1f} of {rate:.1f} req/s can be served")
    return msgs


def _mw(w: float) -> str:
    return f"{w / 1e6:,.2f} MW" if w >= 1e6 else f"{w / 1e3:,.1f} kW"


def _program(fleet: Fleet, cands: O.Candidates, objective: str, relaxed: bool):
    opts = [o for w in cands.train.values() for o in w] + [o for w in cands.serve.values() for o in w]
    co = [_coefs(o, objective) for o in opts]
    prim = np.array([a for a, _ in co])
    tie = np.array([b for _, b in co])
    dl = {w.name: getattr(w, "deadline_h", None) for w in fleet.workloads}
    late = np.array([o.lateness_h / dl[o.workload] if o.lateness_h > 0 else 0.0 for o in opts])
    return opts, P.build(fleet, opts, prim, tie, late, objective, relaxed)


def plan_fleet(fleet: Fleet, perf: PerfModel, objective: str = "cost", time_limit: float = 60.0,
               gap: float = 1e-4, colgen_above: int = 5000) -> Plan:
    """Solve; on infeasibility, solve the slack program and explain what binds.

    Up to `colgen_above` options the whole MILP goes to HiGHS; above it, column generation
    (program.solve_colgen) keeps the MILP small and still reports a true optimality gap.
    """
    t0 = time.perf_counter()
    cands = O.build(fleet, perf, objective)
    t_opts = time.perf_counter() - t0
    notes = list(cands.notes) + [f"{w}: not on {r}" for w, rs in cands.skipped.items() for r in rs]
    diag = [f"{w}: no placement meets every limit: " + _short(rs) for w, rs in cands.blocked.items()]
    opts, prog = _program(fleet, cands, objective, relaxed=False)
    n_opt = len(opts)
    status, x, g, which = 2, None, None, "strict"
    if not cands.blocked and n_opt:
        if n_opt <= colgen_above:
            status, x, g, _ = P.solve_direct(prog, time_limit, gap)
        else:
            # Phase I runs on the same options plus slack columns (is the LP feasible at all?).
            _, rprog = _program(fleet, cands, objective, relaxed=True)
            status, x, g, which = P.solve_colgen(prog, rprog, np.arange(n_opt), time_limit, gap)
        if x is not None and status in (0, 1):
            plan = Plan(objective, "optimal" if status == 0 else "feasible", _placements(fleet, opts, x),
                        gap=g, n_options=n_opt, notes=notes)
            _totals(plan, fleet)
            plan.solve_s, plan.options_s = time.perf_counter() - t0, t_opts
            return plan
        if status == 1 and x is None:
            plan = Plan(objective, "infeasible", [], n_options=n_opt, notes=notes,
                        diagnosis=[f"no feasible plan found within the {time_limit:.0f} s time limit"])
            plan.solve_s, plan.options_s = time.perf_counter() - t0, t_opts
            return plan
    # Infeasible: explain with the slack program (deadline-missing options included).
    late = O.build(fleet, perf, objective, keep_late=True)
    lopts, lprog = _program(fleet, late, objective, relaxed=True)
    if lopts:
        if len(lopts) <= colgen_above:
            _, lx, _, _ = P.solve_direct(lprog, time_limit, gap)
        else:
            r = P.colgen(lprog, P.initial_columns(lprog))
            lx = None
            if r is not None:  # the MILP over the generated columns: a relaxation, maybe not the least

                _, lx = P._milp(lprog, r[0], time_limit, gap)
        if lx is not None:
            diag += _diagnose(fleet, lopts, lx, lprog.slack)
    plan = Plan(objective, "infeasible", [], n_options=len(lopts), diagnosis=diag or
                ["infeasible; the slack program found no single binding constraint"], notes=notes)
    plan.solve_s, plan.options_s = time.perf_counter() - t0, t_opts
    return plan


def _short(reasons: list[str], keep: int = 4) -> str:
    more = len(reasons) - keep
    return "; ".join(reasons[:keep]) + (f"; and {more} more pool(s)" if more > 0 else "")

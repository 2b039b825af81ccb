"""The optimiser: a mixed-integer program (HiGHS via scipy.optimize.milp) over candidate placements.

Variables: y_o in {0,1} per training option (exactly one per run), z_o in {0..max} replicas per
serving option, and T (the finishing time) for the time objective. Constraints: one option per
run, replicas x requests/s >= each service's rate, chips used <= each pool, summed power <= the
site cap, finish of every run <= T. Objectives: marginal dollars, energy (kWh), or T; a 1e-6
tie-break (list-price dollars, or dollars) picks the thriftiest of equal plans.

When nothing is feasible, the same program is solved again with slack on every constraint (extra
pool chips, extra power, lateness past a deadline, unserved requests, an unplaced run), each slack
normalised by its limit, and the slacks the solver needed are reported: which constraint binds and
by how much. That is one minimal relaxation, not the only one.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from polychip.plan import options as O
from polychip.plan.fleet import Fleet
from polychip.plan.perf import PerfModel, ServeConfig

TIE = 1e-6


@dataclass
class Placement:
    workload: str
    kind: str
    pool: str
    chip: str
    chips: int  # total chips held
    replicas: int
    start_h: float
    finish_h: float
    cost: float | None
    list_cost: float | None
    energy_kwh: float
    power_w: float
    lateness_h: float
    source: str
    detail: str
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


def _milp(fleet: Fleet, train: list[O.Option], serve: list[O.Option], objective: str, relaxed: bool,
          time_limit: float, gap: float):
    """Build and solve. Returns (scipy result, column map)."""
    tw = sorted({o.workload for o in train})
    sw = sorted({o.workload for o in serve})
    services = {w.name: w for w in fleet.workloads}
    pools = {p.name: i for i, p in enumerate(fleet.pools)}
    nT, nS = len(train), len(serve)
    col = {"T": None}
    ncol = nT + nS
    if objective == "time":
        col["T"] = ncol
        ncol += 1
    if relaxed:
        col["u"] = {w: ncol + i for i, w in enumerate(tw)}
        ncol += len(tw)
        col["v"] = {w: ncol + i for i, w in enumerate(sw)}
        ncol += len(sw)
        col["sp"] = {p: ncol + i for p, i in pools.items()}
        ncol += len(pools)
        col["sP"] = ncol
        ncol += 1
    c = np.zeros(ncol)
    prim = np.array([_coefs(o, objective)[0] for o in train + serve])
    tie = np.array([_coefs(o, objective)[1] for o in train + serve])
    if objective == "time":
        scale = max([o.finish_h for o in train] + [1.0])
        c[col["T"]] = 1.0
    else:
        scale = max(float(np.abs(prim).sum()), 1.0)
    tie_w = TIE * scale / max(float(np.abs(tie).sum()), 1e-12)
    c[: nT + nS] = prim + tie_w * tie
    if relaxed:
        # Normalised slacks dominate; the original objective only breaks ties between relaxations.
        c[: nT + nS] = c[: nT + nS] * 1e-6 / scale
        if col["T"] is not None:
            c[col["T"]] = 1e-6 / scale
        late = {w.name: w.deadline_h for w in fleet.workloads if getattr(w, "deadline_h", None)}
        for i, o in enumerate(train):
            if o.lateness_h > 0:
                c[i] += o.lateness_h / late[o.workload]
        for w in tw:
            c[col["u"][w]] = 10.0
        for w in sw:
            c[col["v"][w]] = 10.0
        for p in fleet.pools:
            c[col["sp"][p.name]] = 1.0 / p.count
        c[col["sP"]] = 1.0 / fleet.power_cap_w if fleet.power_cap_w else 0.0

    rows, cols, vals, lb, ub = [], [], [], [], []
    r = 0
    by_w: dict[str, list[int]] = {}
    for i, o in enumerate(train):
        by_w.setdefault(o.workload, []).append(i)
    for w in tw:  # exactly one option per training run
        for i in by_w[w]:
            rows.append(r), cols.append(i), vals.append(1.0)
        if relaxed:
            rows.append(r), cols.append(col["u"][w]), vals.append(1.0)
        lb.append(1.0), ub.append(1.0)
        r += 1
    by_s: dict[str, list[int]] = {}
    for j, o in enumerate(serve):
        by_s.setdefault(o.workload, []).append(nT + j)
    for w in sw:  # replicas cover the request rate
        rate = services[w].rate
        for k in by_s[w]:
            rows.append(r), cols.append(k), vals.append(serve[k - nT].rps / rate)
        if relaxed:
            rows.append(r), cols.append(col["v"][w]), vals.append(1.0)
        lb.append(1.0), ub.append(np.inf)
        r += 1
    for p in fleet.pools:  # pool sizes
        idx = [(i, o.chips) for i, o in enumerate(train + serve) if o.pool == p.name]
        if not idx and not relaxed:
            continue
        for i, ch in idx:
            rows.append(r), cols.append(i), vals.append(ch / p.count)
        if relaxed:
            rows.append(r), cols.append(col["sp"][p.name]), vals.append(-1.0 / p.count)
        lb.append(-np.inf), ub.append(1.0)
        r += 1
    if fleet.power_cap_w:  # site power
        for i, o in enumerate(train + serve):
            rows.append(r), cols.append(i), vals.append(o.power_w / fleet.power_cap_w)
        if relaxed:
            rows.append(r), cols.append(col["sP"]), vals.append(-1.0 / fleet.power_cap_w)
        lb.append(-np.inf), ub.append(1.0)
        r += 1
    if col["T"] is not None:  # T >= finish of each run
        for w in tw:
            for i in by_w[w]:
                rows.append(r), cols.append(i), vals.append(train[i].finish_h)
            rows.append(r), cols.append(col["T"]), vals.append(-1.0)
            lb.append(-np.inf), ub.append(0.0)
            r += 1
    A = coo_matrix((vals, (rows, cols)), shape=(r, ncol)).tocsr()
    integrality = np.zeros(ncol)
    integrality[: nT + nS] = 1
    lo = np.zeros(ncol)
    hi = np.full(ncol, np.inf)
    hi[:nT] = 1
    for j, o in enumerate(serve):
        hi[nT + j] = o.max_units
    if relaxed:
        for w in tw:
            integrality[col["u"][w]] = 1
            hi[col["u"][w]] = 1
        for w in sw:
            hi[col["v"][w]] = 1
    res = milp(c, integrality=integrality, bounds=Bounds(lo, hi),
               constraints=[LinearConstraint(A, lb, ub)] if r else [],
               options={"time_limit": time_limit, "mip_rel_gap": gap, "disp": False})
    return res, col


def _placements(fleet: Fleet, train, serve, x) -> list[Placement]:
    pools = {p.name: p for p in fleet.pools}
    out = []
    for i, o in enumerate(train + serve):
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
                       "hbm_gb_per_chip": e.hbm_bytes_per_chip / 1e9}
        mul = units

        def scale(v):
            return None if v is None else v * mul

        out.append(Placement(o.workload, o.kind, o.pool, o.chip, o.chips * units, units if o.kind == "serve" else 1,
                             o.start_h, o.finish_h, scale(o.cost), scale(o.list_cost), o.energy_kwh * units,
                             o.power_w * units, o.lateness_h, e.source, e.detail, figures, flags))
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


def _diagnose(fleet: Fleet, train, serve, x, col) -> list[str]:
    msgs = []
    pools = {p.name: p for p in fleet.pools}
    if fleet.power_cap_w and x[col["sP"]] > 1e-6:
        short = x[col["sP"]]
        msgs.append(f"power cap short by {_mw(short)} (the plan needs {_mw(fleet.power_cap_w + short)} of "
                    f"{_mw(fleet.power_cap_w)}) for the deadlines and services")
    for name, j in col["sp"].items():
        if x[j] > 1e-6:
            p = pools[name]
            msgs.append(f"pool {name} ({p.chip.name}) short by {int(np.ceil(x[j] - 1e-6))} chips "
                        f"(needs {p.count + int(np.ceil(x[j] - 1e-6))}, has {p.count})")
    for i, o in enumerate(train):
        if x[i] > 0.5 and o.lateness_h > 0:
            msgs.append(f"run {o.workload} misses its deadline by {o.lateness_h:.1f} h even on {o.chips} {o.chip} "
                        f"chips in {o.pool}")
    for w, j in col["u"].items():
        if x[j] > 0.5:
            msgs.append(f"run {w} cannot be placed within the pools")
    for w, j in col["v"].items():
        if x[j] > 1e-6:
            rate = next(s.rate for s in fleet.workloads if s.name == w)
            msgs.append(f"service {w}: only {rate * (1 - x[j]):.1f} of {rate:.1f} req/s can be served")
    return msgs


def _mw(w: float) -> str:
    return f"{w / 1e6:,.2f} MW" if w >= 1e6 else f"{w / 1e3:,.1f} kW"


def plan_fleet(fleet: Fleet, perf: PerfModel, objective: str = "cost", time_limit: float = 60.0,
               gap: float = 1e-4) -> Plan:
    """Solve; on infeasibility, solve the slack program and explain what binds."""
    t0 = time.perf_counter()
    cands = O.build(fleet, perf, objective)
    train = [o for w in cands.train.values() for o in w]
    serve = [o for w in cands.serve.values() for o in w]
    notes = list(cands.notes) + [f"{w}: not on {r}" for w, rs in cands.skipped.items() for r in rs]
    if not cands.blocked:
        res, col = _milp(fleet, train, serve, objective, False, time_limit, gap)
        if res.x is not None and res.status in (0, 1):
            plan = Plan(objective, "optimal" if res.status == 0 else "feasible", _placements(fleet, train, serve, res.x),
                        gap=getattr(res, "mip_gap", None), n_options=len(train) + len(serve), notes=notes)
            _totals(plan, fleet)
            plan.solve_s = time.perf_counter() - t0
            return plan
        if res.status == 1:
            plan = Plan(objective, "infeasible", [], n_options=len(train) + len(serve), notes=notes,
                        diagnosis=[f"no feasible plan found within the {time_limit:.0f} s time limit"])
            plan.solve_s = time.perf_counter() - t0
            return plan
    # Infeasible: explain.
    diag = [f"{w}: no placement meets every limit: " + "; ".join(rs) for w, rs in cands.blocked.items()]
    late = O.build(fleet, perf, objective, keep_late=True)
    ltrain = [o for w in late.train.values() for o in w]
    lserve = [o for w in late.serve.values() for o in w]
    res, col = _milp(fleet, ltrain, lserve, objective, True, time_limit, gap)
    if res.x is not None:
        diag += _diagnose(fleet, ltrain, lserve, res.x, col)
    plan = Plan(objective, "infeasible", [], n_options=len(ltrain) + len(lserve), diagnosis=diag or
                ["infeasible; the slack program found no single binding constraint"], notes=notes)
    plan.solve_s = time.perf_counter() - t0
    return plan

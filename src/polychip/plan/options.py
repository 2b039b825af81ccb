"""Candidate placements: every way a workload could run on a pool, with its time, cost, power, energy.

Training: one option per (workload, pool, chip count); the optimiser picks exactly one per run.
Counts are powers of two between the run's min and max (and the pool size, and batch x max_tensor),
plus the min and the whole pool. A run lives in one pool: synchronous training does not span clouds.
Serving: one option per (service, pool) holding the best replica shape for that chip; the optimiser
picks how many replicas. Services run for the whole horizon, so only pools available at the start
can host them.

Time model (conservative, stated in every report): a placement holds its chips from its pool's
availability until it finishes; pool sizes and the power cap are checked as if every placement ran
at once. Reserved pools are paid for the whole horizon whatever runs on them, so using them adds no
marginal cost; on-demand pools cost chips x hours x price.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from polychip.plan.fleet import Fleet, Pool, TrainWorkload
from polychip.plan.perf import PerfModel, ServeConfig, TrainEstimate
from polychip.plan.roofline import pow2_upto

OBJECTIVES = ("cost", "time", "energy")


@dataclass
class Footprint:
    """What a placement holds and spends: chips of one pool from start_h to finish_h, dollars, energy, power.

    On an Option the figures are per unit the optimiser picks (one training run, or one serving
    replica); on a solve.Placement they are the totals over its replicas.
    """

    workload: str
    kind: str  # train | serve
    pool: str
    chip: str
    chips: int
    start_h: float
    finish_h: float
    #: USD the objective sees: chip-hours x price on on-demand pools, 0 on reserved ones.
    cost: float | None
    #: USD at the pool's list price whatever the pricing.
    list_cost: float | None
    energy_kwh: float
    power_w: float
    lateness_h: float = 0.0


@dataclass
class Option(Footprint):
    """One candidate: train, a run on `chips` chips; serve, one replica of `chips` chips."""

    rps: float = 0.0  # serve: requests/s per replica
    max_units: int = 1  # serve: most replicas the pool can hold
    est: TrainEstimate | ServeConfig | None = None


@dataclass
class Candidates:
    train: dict[str, list[Option]] = field(default_factory=dict)
    serve: dict[str, list[Option]] = field(default_factory=dict)
    #: workload -> reasons it has no feasible option (each pool or chip kind, one line).
    blocked: dict[str, list[str]] = field(default_factory=dict)
    #: workload -> pools ruled out for it (and why), when others remain.
    skipped: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _allowed(w, pool: Pool) -> bool:
    return not w.chips or pool.chip.name in w.chips


def _pareto(rows: list[tuple], objective: str, avail_h: float, deadline_h: float | None) -> list[tuple]:
    """Counts of one pool that no smaller count beats or ties on everything the plan sees.

    rows: (n, estimate, hours, chip-hours) sorted by n. Within a pool, chips and power grow with n,
    and cost and energy grow with chip-hours (price and watts are the pool's), so a count survives
    only if it is better on chip-hours (cost, energy) or hours (time) or lateness than every
    smaller kept count.
    """
    keep: list[tuple] = []
    for r in rows:
        late = max(0.0, avail_h + r[2] - deadline_h) if deadline_h is not None else 0.0
        key = (r[3], late) if objective != "time" else (r[2], r[3], late)
        if not any(all(a <= b for a, b in zip(k, key)) for k, _ in keep):
            keep.append((key, r))
    return [r for _, r in keep]


class _TrainRows:
    """(n, estimate, hours, chip-hours) for every candidate count of a run on a chip kind, by n.

    The performance model is asked once per (model identity, shape of the run, chip, n) and shared
    across workloads: large fleets repeat the same few runs on the same few chips."""

    def __init__(self, fleet: Fleet, perf: PerfModel):
        self.fleet, self.perf = fleet, perf
        self.hi_max = max(p.count for p in fleet.pools)
        self.cache: dict = {}

    def __call__(self, w: TrainWorkload, chip) -> list[tuple]:
        key = (id(w.model), w.seq_len, w.batch, w.remat, w.max_tensor, w.dtype, w.layout, w.grad_accum, w.min_chips,
               w.max_chips, chip.name)
        if key not in self.cache:
            hi_max = self.hi_max
            top = min(hi_max, w.max_chips or hi_max, w.batch * w.max_tensor)
            if w.layout is not None:  # a fixed layout runs on exactly its devices' chips
                counts = [w.layout.devices // chip.devices_per_chip] \
                    if w.layout.devices % chip.devices_per_chip == 0 else []
            else:
                counts = sorted({c for c in pow2_upto(top) if c >= w.min_chips} | {w.min_chips}
                                | {min(p.count, top) for p in self.fleet.pools
                                   if p.chip is chip and p.count >= w.min_chips})
            rows = []
            for n in counts:
                est = self.perf.train(w, chip, n)
                if est is not None:
                    rows.append((n, est, 1.0 / est.tokens_per_s / 3600.0))
            self.cache[key] = rows
        return [(n, est, w.tokens * h, n * w.tokens * h) for n, est, h in self.cache[key]]


def _costs(pool: Pool, chip_hours: float) -> tuple[float | None, float | None]:
    """(cost the objective sees, list cost) of chip_hours on a pool: reserved pools are already paid for."""
    lc = None if pool.price_per_hour is None else chip_hours * pool.price_per_hour
    return (None if lc is None else (0.0 if pool.pricing == "reserved" else lc)), lc


def _train_options(w: TrainWorkload, p: Pool, rows: _TrainRows, objective: str, keep_late: bool, oh: float,
                   reasons: list[str]) -> list[Option]:
    """The Pareto-useful chip counts of run w on pool p; why it cannot run there goes to `reasons`."""
    hi = min(p.count, w.max_chips or p.count, w.batch * w.max_tensor)
    if hi < w.min_chips:
        reasons.append(f"{p.name}: {p.count} chips, below min_chips {w.min_chips}")
        return []
    # This pool's counts: powers of two up to its size, plus the run's minimum and the whole pool.
    mine = [t for t in rows(w, p.chip) if t[0] <= hi and (t[0] & (t[0] - 1) == 0 or t[0] == w.min_chips or t[0] == hi
                                                          or w.layout is not None)]
    if not mine and w.layout is not None:
        need = w.layout.devices / p.chip.devices_per_chip
        reasons.append(f"{p.name}: the workload's layout ({w.layout.text()}) takes {need:g} {p.chip.name} chips"
                       + (f"; the pool allows {hi}" if need > hi else "; it cannot run this model and batch"))
        return []
    if not mine:
        reasons.append(f"{p.name}: model state does not fit on {hi} or fewer {p.chip.name} chips")
        return []
    dl = w.deadline_h
    on_time = mine if dl is None else [t for t in mine if p.available_h + t[2] <= dl]
    if not on_time:
        best = min(mine, key=lambda t: t[2])
        reasons.append(f"{p.name}: finishes at {p.available_h + best[2]:.0f} h at best ({best[0]} chips), "
                       f"deadline {dl:.0f} h")
    out = []
    for n, est, dur, ch in _pareto(mine if keep_late else on_time, objective, p.available_h, dl):
        finish = p.available_h + dur
        late = max(0.0, finish - dl) if dl is not None else 0.0
        out.append(Option(w.name, "train", p.name, p.chip.name, n, p.available_h, finish, *_costs(p, ch),
                          ch * p.power_w * oh / 1e3, n * p.power_w * oh, late, est=est))
    return out


def _serve_option(w, p: Pool, fleet: Fleet, perf: PerfModel, oh: float, reasons: list[str]) -> Option | None:
    """The best replica shape of service w on pool p, or None (with the reason in `reasons`)."""
    if p.available_h > 0:
        reasons.append(f"{p.name}: available only from {p.available_h:.0f} h (services need the whole horizon)")
        return None
    cfg = perf.serve(w, p.chip)
    if cfg is None:
        reasons.append(f"{p.name}: " + perf.serve_unreachable(w, p.chip))
        return None
    if cfg.k > p.count:
        reasons.append(f"{p.name}: a replica needs {cfg.k} chips, the pool has {p.count}")
        return None
    units = min(p.count // cfg.k, int(-(-w.rate // cfg.rps)))
    return Option(w.name, "serve", p.name, p.chip.name, cfg.k, 0.0, fleet.horizon_h,
                  *_costs(p, cfg.k * fleet.horizon_h), cfg.k * p.power_w * oh * fleet.horizon_h / 1e3,
                  cfg.k * p.power_w * oh, rps=cfg.rps, max_units=max(1, units), est=cfg)


def build(fleet: Fleet, perf: PerfModel, objective: str, keep_late: bool = False) -> Candidates:
    """All options. keep_late=True keeps options that miss a deadline (with lateness) for diagnosis."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}")
    c = Candidates()
    oh = fleet.power_overhead
    unpriced = [p.name for p in fleet.pools if p.price_per_hour is None]
    if unpriced and objective == "cost":
        c.notes.append(f"pools without a price are left out of a cost plan: {', '.join(unpriced)} "
                       "(give price: in the fleet file to use them)")
    rows = _TrainRows(fleet, perf)
    for w in fleet.workloads:
        reasons: list[str] = []
        opts_all: list[Option] = []
        pools = [p for p in fleet.pools if _allowed(w, p)]
        if not pools:
            reasons.append(f"no pool holds an allowed chip ({', '.join(w.chips)})")
        for p in pools:
            if p.price_per_hour is None and objective == "cost":
                reasons.append(f"{p.name}: no price")
            elif isinstance(w, TrainWorkload):
                opts_all += _train_options(w, p, rows, objective, keep_late, oh, reasons)
            else:
                o = _serve_option(w, p, fleet, perf, oh, reasons)
                opts_all += [o] if o is not None else []
        (c.train if isinstance(w, TrainWorkload) else c.serve)[w.name] = opts_all
        if not opts_all:
            c.blocked[w.name] = reasons or ["no option"]
        elif reasons:
            c.skipped[w.name] = reasons
    return c

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

from polychip.plan.fleet import Fleet, Pool, ServeWorkload, TrainWorkload
from polychip.plan.perf import PerfModel, ServeConfig, TrainEstimate
from polychip.plan.roofline import pow2_upto

OBJECTIVES = ("cost", "time", "energy")


@dataclass
class Option:
    workload: str
    kind: str  # train | serve
    pool: str
    chip: str
    #: train: chips of the placement; serve: chips per replica.
    chips: int
    start_h: float
    finish_h: float
    #: USD the objective sees: chip-hours x price on on-demand pools, 0 on reserved ones (per replica for serve).
    cost: float | None
    #: USD at the pool's list price whatever the pricing (per replica for serve).
    list_cost: float | None
    energy_kwh: float
    power_w: float
    lateness_h: float = 0.0
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


def train_counts(w: TrainWorkload, pool: Pool) -> list[int]:
    hi = min(pool.count, w.max_chips or pool.count, w.batch * w.max_tensor)
    lo = w.min_chips
    if hi < lo:
        return []
    out = {c for c in pow2_upto(hi, 1) if c >= lo} | {lo, hi}
    return sorted(out)


def _dominated(opts: list[Option], key) -> list[Option]:
    """Drop options another option in the same pool beats or ties on every key attribute."""
    keep: list[Option] = []
    for o in sorted(opts, key=key):
        ko = key(o)
        if not any(all(a <= b for a, b in zip(key(k), ko)) for k in keep):
            keep.append(o)
    return keep


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
    for w in fleet.workloads:
        reasons: list[str] = []
        opts_all: list[Option] = []
        pools = [p for p in fleet.pools if _allowed(w, p)]
        if not pools:
            reasons.append(f"no pool holds an allowed chip ({', '.join(w.chips)})")
        for p in pools:
            if p.price_per_hour is None and objective == "cost":
                reasons.append(f"{p.name}: no price")
                continue
            price = p.price_per_hour
            if isinstance(w, TrainWorkload):
                counts = train_counts(w, p)
                if not counts:
                    reasons.append(f"{p.name}: {p.count} chips, below min_chips {w.min_chips}")
                    continue
                mine = []
                for n in counts:
                    est = perf.train(w, p.chip, n)
                    if est is None:
                        continue
                    dur = w.tokens / est.tokens_per_s / 3600.0
                    finish = p.available_h + dur
                    late = max(0.0, finish - w.deadline_h) if w.deadline_h is not None else 0.0
                    lc = None if price is None else n * dur * price
                    mine.append(Option(w.name, "train", p.name, p.chip.name, n, p.available_h, finish,
                                       None if lc is None else (0.0 if p.pricing == "reserved" else lc), lc,
                                       n * p.power_w * oh * dur / 1e3, n * p.power_w * oh, late, est=est))
                if not mine:
                    reasons.append(f"{p.name}: model state does not fit on {counts[-1]} or fewer {p.chip.name} chips")
                    continue
                on_time = [o for o in mine if o.lateness_h == 0]
                if not on_time:
                    best = min(mine, key=lambda o: o.finish_h)
                    reasons.append(f"{p.name}: finishes at {best.finish_h:.0f} h at best ({best.chips} chips), "
                                   f"deadline {w.deadline_h:.0f} h")
                opts_all += mine if keep_late else on_time
            else:
                if p.available_h > 0:
                    reasons.append(f"{p.name}: available only from {p.available_h:.0f} h (services need the whole horizon)")
                    continue
                cfg = perf.serve(w, p.chip)
                if cfg is None:
                    reasons.append(f"{p.name}: " + perf.serve_unreachable(w, p.chip))
                    continue
                if cfg.k > p.count:
                    reasons.append(f"{p.name}: a replica needs {cfg.k} chips, the pool has {p.count}")
                    continue
                lc = None if price is None else cfg.k * fleet.horizon_h * price
                units = min(p.count // cfg.k, int(-(-w.rate // cfg.rps)))
                opts_all.append(Option(w.name, "serve", p.name, p.chip.name, cfg.k, 0.0, fleet.horizon_h,
                                       None if lc is None else (0.0 if p.pricing == "reserved" else lc), lc,
                                       cfg.k * p.power_w * oh * fleet.horizon_h / 1e3, cfg.k * p.power_w * oh,
                                       rps=cfg.rps, max_units=max(1, units), est=cfg))
        if isinstance(w, TrainWorkload):
            # Objective-aware pruning inside each pool: what the objective and the constraints see.
            keyf = {
                "cost": lambda o: (o.cost if o.cost is not None else 0.0, o.chips, o.lateness_h, o.list_cost or 0.0),
                "energy": lambda o: (o.energy_kwh, o.chips, o.lateness_h, o.cost or 0.0),
                "time": lambda o: (o.finish_h, o.chips, o.lateness_h, o.cost or 0.0),
            }[objective]
            kept = []
            for p in {o.pool for o in opts_all}:
                kept += _dominated([o for o in opts_all if o.pool == p], keyf)
            c.train[w.name] = sorted(kept, key=lambda o: (o.pool, o.chips))
        else:
            c.serve[w.name] = opts_all
        if not opts_all:
            c.blocked[w.name] = reasons or ["no option"]
        elif reasons:
            c.skipped[w.name] = reasons
    return c

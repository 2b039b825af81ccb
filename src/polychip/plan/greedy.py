"""Greedy cheapest-first baseline: the yardstick the MILP must never lose to.

Training runs are taken largest first (by their cheapest option's chip count); each gets its
cheapest option (by the objective's coefficient) that still fits the pools and power cap left.
Services then fill their request rate from the replica options with the lowest objective per
request. Returns None when the greedy pass leaves something unplaced.
"""
from __future__ import annotations

from polychip.plan import options as O
from polychip.plan.fleet import Fleet
from polychip.plan.solve import Plan, _coefs, _placements, _totals


def greedy(fleet: Fleet, cands: O.Candidates, objective: str) -> Plan | None:
    if cands.blocked:
        return None
    free = {p.name: p.count for p in fleet.pools}
    power = fleet.power_cap_w if fleet.power_cap_w else float("inf")
    train = [o for w in cands.train.values() for o in w]
    serve = [o for w in cands.serve.values() for o in w]
    x = [0] * (len(train) + len(serve))
    index = {id(o): i for i, o in enumerate(train + serve)}

    def key(o):
        return _coefs(o, objective)[0] if objective != "time" else o.finish_h, _coefs(o, objective)[1]

    order = sorted(cands.train, key=lambda w: -min(o.chips for o in cands.train[w]))
    for w in order:
        for o in sorted(cands.train[w], key=key):
            if o.chips <= free[o.pool] and o.power_w <= power + 1e-9:
                free[o.pool] -= o.chips
                power -= o.power_w
                x[index[id(o)]] = 1
                break
        else:
            return None
    services = {w.name: w for w in fleet.workloads}
    for w, opts in cands.serve.items():
        need = services[w].rate
        for o in sorted(opts, key=lambda o: (key(o)[0] / o.rps, key(o)[1] / o.rps)):
            while need > 1e-9 and o.chips <= free[o.pool] and o.power_w <= power + 1e-9 \
                    and x[index[id(o)]] < o.max_units:
                free[o.pool] -= o.chips
                power -= o.power_w
                x[index[id(o)]] += 1
                need -= o.rps
        if need > 1e-9:
            return None
    plan = Plan(objective, "greedy", _placements(fleet, train + serve, x), n_options=len(x))
    _totals(plan, fleet)
    return plan

"""What-if: scale a pool, change a price or the power cap, re-plan, and show the difference."""
from __future__ import annotations

import dataclasses
import math

from polychip.plan import units
from polychip.plan.errors import PlanError
from polychip.plan.fleet import Fleet
from polychip.plan.solve import Plan


def _pairs(items: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for it in items or []:
        if "=" not in it:
            raise PlanError(f"{flag} {it!r}: expected NAME=VALUE")
        k, v = it.split("=", 1)
        out.append((k.strip(), v.strip()))
    return out


def apply(fleet: Fleet, scale_pool: list[str] = (), price: list[str] = (), power_cap: str | None = None) -> tuple[Fleet, list[str]]:
    """A modified copy of `fleet` and one line per change. NAME is a pool name, or for --price also a chip name."""
    pools = list(fleet.pools)
    changes = []
    for name, val in _pairs(scale_pool, "--scale-pool"):
        try:
            f = float(val)
        except ValueError:
            raise PlanError(f"--scale-pool {name}={val}: the factor must be a number") from None
        if not math.isfinite(f) or f <= 0:
            raise PlanError(f"--scale-pool {name}={val}: the factor must be a positive number")
        idx = [i for i, p in enumerate(pools) if p.name == name]
        if not idx:
            raise PlanError(f"--scale-pool: no pool named {name!r}; pools: {', '.join(p.name for p in pools)}")
        for i in idx:
            new = max(1, int(round(pools[i].count * f)))
            changes.append(f"pool {name}: {pools[i].count} -> {new} chips")
            pools[i] = dataclasses.replace(pools[i], count=new)
    for name, val in _pairs(price, "--price"):
        try:
            usd = units.count(val, "price")
        except ValueError as e:
            raise PlanError(f"--price {name}={val}: {e}") from None
        idx = [i for i, p in enumerate(pools) if p.name == name or p.chip.name == name]
        if not idx:
            raise PlanError(f"--price: no pool or chip named {name!r} in the fleet")
        for i in idx:
            changes.append(f"pool {pools[i].name}: price {pools[i].price_per_hour} -> {usd} USD/chip-hr")
            pools[i] = dataclasses.replace(pools[i], price_per_hour=usd, price_source="--price (what-if)")
    cap = fleet.power_cap_w
    if power_cap is not None:
        try:
            cap = units.power_w(power_cap)
        except ValueError as e:
            raise PlanError(f"--power-cap {power_cap}: {e}") from None
        changes.append(f"power cap: {_w(fleet.power_cap_w)} -> {_w(cap)}")
    return dataclasses.replace(fleet, pools=pools, power_cap_w=cap), changes


def _w(w):
    return "none" if w is None else f"{w / 1e6:g} MW"


def diff(base: Plan, new: Plan) -> list[str]:
    """Lines describing how `new` differs from `base`."""
    out = [f"status: {base.status} -> {new.status}"]

    def num(label, a, b, fmt):
        if a is None or b is None:
            out.append(f"{label}: {a if a is None else fmt(a)} -> {b if b is None else fmt(b)}")
        else:
            out.append(f"{label}: {fmt(a)} -> {fmt(b)} ({'+' if b >= a else ''}{fmt(b - a)})")

    if base.status != "infeasible" and new.status != "infeasible":
        num("cost", base.cost, new.cost, lambda v: f"${v:,.0f}")
        num("energy MWh", base.energy_kwh / 1e3, new.energy_kwh / 1e3, lambda v: f"{v:,.1f}")
        num("peak power MW", base.peak_power_w / 1e6, new.peak_power_w / 1e6, lambda v: f"{v:,.2f}")
        num("last finish h", base.makespan_h, new.makespan_h, lambda v: f"{v:,.0f}")

    def where(plan):
        d: dict[str, str] = {}
        for p in plan.placements:
            d[p.workload] = (d[p.workload] + " + " if p.workload in d else "") + f"{p.chips} x {p.chip} in {p.pool}"
        return d

    a, b = where(base), where(new)
    for w in sorted(set(a) | set(b)):
        if a.get(w) != b.get(w):
            out.append(f"{w}: {a.get(w, 'unplaced')} -> {b.get(w, 'unplaced')}")
    return out

"""Plan output: terminal table (rich), JSON, and a report folder (PNG plots + one HTML page + launch specs)."""
from __future__ import annotations

import html
import json
from pathlib import Path

from polychip.files import atomic_write
from polychip.plan.fleet import Fleet
from polychip.plan.solve import Plan

ASSUMPTIONS = (
    "Pools and the power cap are checked as if every placement ran at once; a placement holds its chips "
    "from its pool's availability until it finishes. Reserved pools cost nothing extra to use (their "
    "committed spend is shown apart). Energy counts chip power x overhead x hours at full power.")


def _money(v) -> str:
    return "n/a" if v is None else f"${v:,.0f}"


def _figure(p) -> str:
    f = p.figures
    if p.kind == "train":
        band = f.get("band")
        pm = f" (estimate +/-{band:.0%})" if band is not None else ""
        return f"{f['step_time_s']:.2f} s/step{pm}, {f['tokens_per_s']:,.0f} tok/s, MFU {f['mfu']:.0%}"
    return (f"{p.replicas} x {f['replica_chips']} chips, {f['requests_per_s']:.1f} req/s, "
            f"TTFT {f['ttft_s'] * 1e3:.0f} ms, TPOT {f['tpot_s'] * 1e3:.1f} ms")


def rows(plan: Plan) -> list[list[str]]:
    out = []
    for p in plan.placements:
        out.append([p.workload, p.kind, p.pool, p.chip, str(p.chips), _figure(p),
                    f"{p.finish_h:.0f}" if p.kind == "train" else "-", _money(p.cost),
                    f"{p.energy_kwh / 1e3:,.1f}" + ("*" if p.flags and any("ESTIMATE" in x for x in p.flags) else ""),
                    p.source])
    return out


HEADER = ["workload", "kind", "pool", "chip", "chips", "performance", "finish h", "cost", "MWh", "source"]


def summary(plan: Plan) -> list[str]:
    lines = [f"objective {plan.objective}: {plan.status}"
             + (f" (gap {plan.gap:.2g})" if plan.gap is not None else "")
             + f", {plan.n_options} options, solved in {plan.solve_s:.2f} s"]
    if plan.status != "infeasible":
        lines.append(f"cost {_money(plan.cost)} (+ reserved committed {_money(plan.committed_cost)}), "
                     f"energy {plan.energy_kwh / 1e3:,.1f} MWh, peak power {plan.peak_power_w / 1e6:,.2f} MW, "
                     f"last run finishes at {plan.makespan_h:,.0f} h")
    return lines


def flags(plan: Plan) -> list[str]:
    seen: list[str] = []
    for p in plan.placements:
        for f in p.flags:
            line = f"{p.pool}: {f}"
            if line not in seen:
                seen.append(line)
    return seen


def print_plan(plan: Plan, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for line in summary(plan):
        console.print(line, highlight=False)
    if plan.placements:
        t = Table(*HEADER)
        for r in rows(plan):
            t.add_row(*r)
        console.print(t)
    for d in plan.diagnosis:
        console.print(f"[bold red]binding:[/] {d}", highlight=False)
    for f in flags(plan):
        console.print(f"[yellow]note:[/] {f}", highlight=False)
    if any("ESTIMATE" in f for f in flags(plan)):
        console.print("* energy uses an estimated chip power (see notes)", highlight=False)


def plan_json(plan: Plan, fleet: Fleet) -> dict:
    d = plan.to_json()
    d["assumptions"] = ASSUMPTIONS
    d["horizon_h"] = fleet.horizon_h
    d["power_cap_w"] = fleet.power_cap_w
    d["pools"] = [{"name": p.name, "chip": p.chip.name, "count": p.count, "price_per_hour": p.price_per_hour,
                   "price_source": p.price_source, "pricing": p.pricing, "power_w": p.power_w,
                   "power_source": p.power_source, "available_h": p.available_h} for p in fleet.pools]
    return d


def write_json(plan: Plan, fleet: Fleet, path: str | Path) -> None:
    atomic_write(Path(path), json.dumps(plan_json(plan, fleet), indent=1))


def power_curve(plan: Plan, horizon_h: float) -> tuple[list[float], list[float]]:
    """Step curve (hours, watts) of the summed power of the placements running at each moment."""
    edges = sorted({0.0, horizon_h, *[p.start_h for p in plan.placements], *[p.finish_h for p in plan.placements]})
    ts, ws = [], []
    for t in edges:
        w = sum(p.power_w for p in plan.placements if p.start_h <= t < p.finish_h)
        ts.append(t)
        ws.append(w)
    return ts, ws


def _plots(plan: Plan, fleet: Fleet, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    pools = [p.name for p in fleet.pools]
    works = sorted({p.workload for p in plan.placements})
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(pools) + 1.5))
    left = [0] * len(pools)
    for w in works:
        vals = [sum(p.chips for p in plan.placements if p.pool == pool and p.workload == w) for pool in pools]
        ax.barh(pools, vals, left=left, label=w)
        left = [a + b for a, b in zip(left, vals)]
    ax.barh(pools, [p.count for p in fleet.pools], fill=False, edgecolor="black", linewidth=0.8, label="pool size")
    ax.set_xlabel("chips")
    ax.set_title("Chips by pool and workload")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(folder / "chips.png", dpi=110)
    plt.close(fig)
    names.append("chips.png")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 0.35 * len(works) + 2))
    a1.barh(works, [sum((p.list_cost or 0) for p in plan.placements if p.workload == w) for w in works])
    a1.set_xlabel("USD at list price")
    a1.set_title("Cost by workload")
    a2.barh(works, [sum(p.energy_kwh for p in plan.placements if p.workload == w) / 1e3 for w in works])
    a2.set_xlabel("MWh")
    a2.set_title("Energy by workload")
    fig.tight_layout()
    fig.savefig(folder / "cost_energy.png", dpi=110)
    plt.close(fig)
    names.append("cost_energy.png")

    ts, ws = power_curve(plan, fleet.horizon_h)
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.step(ts, [w / 1e6 for w in ws], where="post", label="plan")
    if fleet.power_cap_w:
        ax.axhline(fleet.power_cap_w / 1e6, color="red", linestyle="--", label="site cap")
    ax.set_xlabel("hours from start")
    ax.set_ylabel("MW")
    ax.set_title("Power over the plan")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "power.png", dpi=110)
    plt.close(fig)
    names.append("power.png")
    return names


def write_report(plan: Plan, fleet: Fleet, folder: str | Path, extra: list[str] = ()) -> Path:
    """plan.json, chips.png, cost_energy.png, power.png, index.html and launch/*.yaml under `folder`."""
    from polychip.plan.launch import write_tasks

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(plan, fleet, folder / "plan.json")
    images = _plots(plan, fleet, folder) if plan.placements else []
    specs = write_tasks(fleet, plan, folder / "launch")
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>polychip plan</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}.bad{color:#b00}.note{color:#850}</style>",
             "</head><body>", f"<h1>polychip plan: {e(fleet.path)}</h1>"]
    parts += [f"<p>{e(line)}</p>" for line in summary(plan)]
    parts += [f"<p class='bad'>binding: {e(d)}</p>" for d in plan.diagnosis]
    if plan.placements:
        parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in HEADER) + "</tr>")
        for r in rows(plan):
            parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>")
        parts.append("</table>")
        parts.append("<h2>Where each figure came from</h2><ul>")
        parts += [f"<li>{e(p.workload)} on {e(p.pool)}: {e(p.source)}: {e(p.detail)}</li>" for p in plan.placements]
        parts.append("</ul>")
    parts += [f"<img src='{n}' alt='{n}'><br>" for n in images]
    notes = flags(plan) + list(plan.notes) + list(extra)
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li class='note'>{e(n)}</li>" for n in notes) + "</ul>")
    parts.append(f"<p>{e(ASSUMPTIONS)}</p>")
    if specs:
        parts.append("<h2>Launch specs (SkyPilot)</h2><ul>"
                     + "".join(f"<li><a href='launch/{s.name}'>{e(s.name)}</a></li>" for s in specs) + "</ul>")
    parts.append("</body></html>")
    atomic_write(folder / "index.html", "\n".join(parts))
    return folder / "index.html"

"""Planner scale benchmark: 10,000 workloads over 100 pools (goal: solve < 10 s on 2 cores).

Prints: time to build the candidate options (performance model included), MILP solve time, the
solver's reported optimality gap, and the greedy cheapest-first baseline's objective for scale.

    JAX_PLATFORMS=cpu .venv/bin/python bench/plan_solve.py [--workloads 10000] [--pools 100] [--objective cost]
"""
from __future__ import annotations

import argparse
import os
import random
import time

from polychip.hardware import load_catalog
from polychip.plan import options as O
from polychip.plan import parse_fleet
from polychip.plan.greedy import greedy
from polychip.plan.perf import PerfModel
from polychip.plan.published import published_records
from polychip.plan.solve import plan_fleet

GROUPS = {  # what a workload's code base can run on
    "tpu": ["tpu-v5e", "tpu-v5p", "tpu-v6e", "tpu7x", "tpu-v4"],
    "gpu": ["h100", "h200", "b200", "gb200"],
    "neuron": ["trn1", "trn2", "trn3"],
    "jax-any": ["tpu-v5e", "tpu-v6e", "h100", "h200"],
}


def scenario(n_work: int, n_pools: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    chips = list(load_catalog())
    lines = ["horizon: 30d", "site: {power_cap: %d MW}" % max(1, n_work // 20), "pools:"]
    clouds = {"tpu": "gcp", "trn": "aws", "inf": "aws"}
    for i in range(n_pools):
        chip = chips[i % len(chips)]
        cloud = clouds.get(chip[:3], rng.choice(["aws", "gcp", "azure"]))
        count = rng.choice([256, 512, 1024, 2048]) * max(1, n_work // 4000)
        price = round(rng.uniform(0.8, 14.0), 2)
        extra = ", pricing: reserved" if rng.random() < 0.05 else ""
        avail = f", available: {rng.choice([2, 5, 10])}d" if rng.random() < 0.2 else ""
        lines.append(f"  - {{name: p{i}-{chip}, chip: {chip}, count: {count}, cloud: {cloud}, price: {price}{extra}{avail}}}")
    lines.append("workloads:")
    for i in range(n_work):
        group = rng.choice(list(GROUPS))
        allowed = ", ".join(GROUPS[group])
        if rng.random() < 0.9:
            model = rng.choice(["125m", "1b", "1b", "llama3-8b"])
            tokens = {"125m": 2e9, "1b": 1e10, "llama3-8b": 2e10}[model] * rng.choice([0.5, 1, 2])
            dl = f", deadline: {rng.choice([7, 14, 28])}d" if rng.random() < 0.7 else ""
            lines.append(f"  - {{name: t{i}, kind: train, model: {model}, tokens: {tokens:.3g}, max_chips: 512, "
                         f"chips: [{allowed}]{dl}}}")
        else:
            model = rng.choice(["1b", "llama3-8b"])
            lines.append(f"  - {{name: s{i}, kind: serve, model: {model}, rate: {rng.choice([1, 5, 20])}, "
                         f"prompt_tokens: 1000, output_tokens: 200, tpot: 100ms, chips: [{allowed}]}}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", type=int, default=10_000)
    ap.add_argument("--pools", type=int, default=100)
    ap.add_argument("--objective", default="cost", choices=O.OBJECTIVES)
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--gap", type=float, default=1e-3)
    ap.add_argument("--direct", action="store_true", help="hand HiGHS the whole MILP (no column generation)")
    a = ap.parse_args()
    print(f"host: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (other processes share the cores: "
          "wall times are inflated when it exceeds the core count; CPU seconds are this process's own)")
    t0, c0 = time.perf_counter(), time.process_time()
    fleet = parse_fleet(scenario(a.workloads, a.pools), "bench.yaml")
    print(f"scenario: {a.workloads} workloads, {a.pools} pools; parse {time.perf_counter() - t0:.2f} s wall, "
          f"{time.process_time() - c0:.2f} s CPU")
    perf = PerfModel(published_records(), load_catalog())
    t1, c1 = time.perf_counter(), time.process_time()
    plan = plan_fleet(fleet, perf, a.objective, time_limit=a.time_limit, gap=a.gap,
                      colgen_above=10**12 if a.direct else 5000)
    wall, cpu = time.perf_counter() - t1, time.process_time() - c1
    print(f"options: {plan.n_options} built in {plan.options_s:.2f} s wall (performance model included)")
    print(f"MILP ({a.objective}, {'direct' if a.direct else 'column generation'}): status {plan.status}; "
          f"solve {plan.solve_s - plan.options_s:.2f} s wall; options + solve {wall:.2f} s wall, {cpu:.2f} s CPU; "
          f"optimality gap vs LP bound {plan.gap if plan.gap is None else f'{plan.gap:.3%}'}; "
          f"objective {plan.objective_value}")
    t3 = time.perf_counter()
    g = greedy(fleet, O.build(fleet, perf, a.objective), a.objective)
    t4 = time.perf_counter()
    if g is None:
        print(f"greedy cheapest-first: no feasible plan ({t4 - t3:.2f} s)")
    elif plan.objective_value is not None:
        rel = (g.objective_value - plan.objective_value) / max(abs(plan.objective_value), 1e-9)
        print(f"greedy cheapest-first: objective {g.objective_value:.6g} ({t4 - t3:.2f} s); MILP better by {rel:.2%}")
    for d in plan.diagnosis[:5]:
        print("  binding:", d[:300])


if __name__ == "__main__":
    main()

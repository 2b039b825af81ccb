"""Hand-solvable scenarios: the optimiser's exact assignment, cost and diagnosis."""
import pytest

from polychip.plan import parse_fleet, plan_fleet
from polychip.plan.greedy import greedy
from polychip.plan import options as O

TINY = "{name: %s, kind: train, model: tiny, tokens: %s%s}"  # tiny preset: batch 8 x seq 64


def fleet(pools, works, head="horizon: 100h\n"):
    text = head + "pools:\n" + "".join(f"  - {p}\n" for p in pools) + "workloads:\n" + "".join(f"  - {w}\n" for w in works)
    return parse_fleet(text, "t.yaml")


def where(plan):
    return {p.workload: (p.pool, p.chips) for p in plan.placements}


def test_deadline_forces_the_pricier_pool(stub):
    # 1000 tok/s per chip on both. big: 1.152e9 tokens = 320 chip-hours; 20 h deadline needs >= 16 chips.
    # small: 0.288e9 tokens = 80 chip-hours, no deadline. Cost is chip-hours x price at any chip count,
    # and the fewest chips win ties.
    f = fleet(["{name: cheap, chip: h100, count: 8, price: 1.0}", "{name: pricey, chip: h200, count: 64, price: 2.0}"],
              [TINY % ("big", "1.152e9", ", deadline: 20h"), TINY % ("small", "0.288e9", "")])
    plan = plan_fleet(f, stub(rate={"h100": 1000, "h200": 1000}), "cost")
    assert plan.status == "optimal"
    assert where(plan) == {"big": ("pricey", 16), "small": ("cheap", 1)}
    assert plan.cost == pytest.approx(320 * 2.0 + 80 * 1.0)
    big = next(p for p in plan.placements if p.workload == "big")
    assert big.finish_h == pytest.approx(20.0)


def test_power_cap_moves_the_run_to_frugal_chips(stub):
    pools = ["{name: gpu, chip: h100, count: 8, price: 1.0}",
             "{name: tpu, chip: tpu-v5e, count: 8, price: 2.0, power_w: 100}"]
    run = [TINY % ("r", "0.288e9", ", deadline: 10h, min_chips: 8")]  # 80 chip-hours: 8 chips for 10 h
    perf = stub(rate={"h100": 1000, "tpu-v5e": 1000})
    free = plan_fleet(fleet(pools, run), perf, "cost")
    assert where(free) == {"r": ("gpu", 8)} and free.cost == pytest.approx(80.0)
    capped = plan_fleet(fleet(pools, run, "horizon: 100h\nsite: {power_cap: 1 kW}\n"), perf, "cost")
    assert where(capped) == {"r": ("tpu", 8)} and capped.cost == pytest.approx(160.0)
    assert capped.peak_power_w == pytest.approx(800.0)
    assert capped.energy_kwh == pytest.approx(8 * 100 * 10 / 1e3)


def test_infeasible_power_cap_says_by_how_much(stub):
    pools = ["{name: gpu, chip: h100, count: 8, price: 1.0}",
             "{name: tpu, chip: tpu-v5e, count: 8, price: 2.0, power_w: 100}"]
    run = [TINY % ("r", "0.288e9", ", deadline: 10h")]
    # The cheapest relaxation: 8 v5e chips at 800 W against a 500 W cap (slack 300/500 = 0.6), rather
    # than 4 chips finishing 10 h late (10/10 = 1.0).
    plan = plan_fleet(fleet(pools, run, "horizon: 100h\nsite: {power_cap: 500 W}\n"),
                      stub(rate={"h100": 1000, "tpu-v5e": 1000}), "cost")
    assert plan.status == "infeasible" and not plan.placements
    assert any("power cap short by 0.3 kW" in d for d in plan.diagnosis), plan.diagnosis


def test_infeasible_deadline_says_by_how_much(stub):
    # 320 chip-hours on at most 8 chips: 40 h against a 25 h deadline.
    plan = plan_fleet(fleet(["{name: only, chip: h100, count: 8, price: 1.0}"], [TINY % ("r", "1.152e9", ", deadline: 25h")]),
                      stub(rate={"h100": 1000}), "cost")
    assert plan.status == "infeasible"
    assert any("misses its deadline by 15.0 h" in d for d in plan.diagnosis), plan.diagnosis
    assert any("finishes at 40 h at best" in d for d in plan.diagnosis), plan.diagnosis


def test_service_replicas_and_latency_targets(stub):
    pools = ["{name: a, chip: h100, count: 16, price: 1.0}", "{name: b, chip: h200, count: 16, price: 2.0}"]
    svc = "{name: s, kind: serve, model: tiny, rate: 10, prompt_tokens: 50, output_tokens: 20%s}"
    perf = stub(rps={"h100": 3.0, "h200": 5.0}, k={"h100": 2, "h200": 4}, lat={"h100": (0.5, 0.02), "h200": (0.1, 0.01)})
    plan = plan_fleet(fleet(pools, [svc % ""], "horizon: 10h\n"), perf, "cost")
    (p,) = plan.placements
    assert (p.pool, p.replicas, p.chips) == ("a", 4, 8)  # 4 x 3 req/s >= 10; 8 chips x 10 h x $1
    assert plan.cost == pytest.approx(80.0)
    plan = plan_fleet(fleet(pools, [svc % ", ttft: 200ms"], "horizon: 10h\n"), perf, "cost")
    (p,) = plan.placements
    assert (p.pool, p.replicas, p.chips) == ("b", 2, 8) and plan.cost == pytest.approx(160.0)
    plan = plan_fleet(fleet(pools, [svc % ", ttft: 50ms"], "horizon: 10h\n"), perf, "cost")
    assert plan.status == "infeasible" and any("stub says no" in d for d in plan.diagnosis)


def test_reserved_pool_is_used_before_on_demand(stub):
    pools = ["{name: res, chip: h100, count: 8, price: 5.0, pricing: reserved}",
             "{name: od, chip: h200, count: 8, price: 1.0}"]
    plan = plan_fleet(fleet(pools, [TINY % ("r", "0.288e9", "")]), stub(rate={"h100": 1000, "h200": 1000}), "cost")
    assert where(plan)["r"][0] == "res" and plan.cost == 0.0
    assert plan.committed_cost == pytest.approx(8 * 5.0 * 100)


def test_time_objective_and_late_pool(stub):
    pools = ["{name: now, chip: h100, count: 8, price: 1.0}", "{name: later, chip: h200, count: 64, price: 3.0, available: 10h}"]
    perf = stub(rate={"h100": 1000, "h200": 1000})
    # 320 chip-hours: 40 h on 8 chips now, or 10 h + 5 h on 64 chips that arrive at 10 h.
    plan = plan_fleet(fleet(pools, [TINY % ("r", "1.152e9", "")]), perf, "time")
    assert where(plan) == {"r": ("later", 64)} and plan.makespan_h == pytest.approx(15.0)
    cost = plan_fleet(fleet(pools, [TINY % ("r", "1.152e9", "")]), perf, "cost")
    assert where(cost)["r"][0] == "now" and cost.makespan_h == pytest.approx(320.0)  # 1 chip, 320 h


def test_energy_objective_prefers_low_power(stub):
    pools = ["{name: hot, chip: h100, count: 8, price: 1.0}", "{name: cool, chip: h200, count: 8, price: 9.0, power_w: 300}"]
    plan = plan_fleet(fleet(pools, [TINY % ("r", "0.288e9", "")]), stub(rate={"h100": 1000, "h200": 1000}), "energy")
    assert where(plan)["r"][0] == "cool" and plan.energy_kwh == pytest.approx(80 * 0.3)


def test_greedy_baseline_matches_on_easy_case(stub):
    f = fleet(["{name: cheap, chip: h100, count: 8, price: 1.0}", "{name: pricey, chip: h200, count: 64, price: 2.0}"],
              [TINY % ("big", "1.152e9", ", deadline: 20h"), TINY % ("small", "0.288e9", "")])
    perf = stub(rate={"h100": 1000, "h200": 1000})
    g = greedy(f, O.build(f, perf, "cost"), "cost")
    assert g is not None and g.cost == pytest.approx(720.0)


def test_unplaceable_workload_is_named(stub):
    plan = plan_fleet(fleet(["{name: a, chip: h100, count: 8, price: 1.0}"],
                            ["{name: r, kind: train, model: tiny, tokens: 1M, chips: [tpu-v6e]}"]),
                      stub(rate={"h100": 1000}), "cost")
    assert plan.status == "infeasible" and any("r: no placement" in d and "tpu-v6e" in d for d in plan.diagnosis)

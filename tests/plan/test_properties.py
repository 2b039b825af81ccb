"""Property tests: every plan respects every constraint and never loses to greedy cheapest-first."""
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polychip.plan import options as O
from polychip.plan import parse_fleet, plan_fleet
from polychip.plan.greedy import greedy

CHIPS = ["h100", "h200", "tpu-v5e", "trn2"]
RATE = {"h100": 1000.0, "h200": 1300.0, "tpu-v5e": 400.0, "trn2": 700.0}
RPS = {"h100": 3.0, "h200": 4.0, "tpu-v5e": 1.5, "trn2": 2.0}
K = {"h100": 2, "h200": 2, "tpu-v5e": 4, "trn2": 2}

pool_st = st.fixed_dictionaries({
    "chip": st.sampled_from(CHIPS), "count": st.sampled_from([8, 16, 32, 64]),
    "price": st.sampled_from([1.0, 1.5, 2.0, 3.0]), "power_w": st.sampled_from([200, 400, 700]),
    "reserved": st.booleans(), "available": st.sampled_from([0, 0, 0, 5]),
})
train_st = st.fixed_dictionaries({
    "chip_hours": st.sampled_from([10, 40, 80, 160]), "deadline": st.sampled_from([None, 10, 30, 80]),
    "chips": st.lists(st.sampled_from(CHIPS), min_size=2, max_size=4, unique=True),
})
serve_st = st.fixed_dictionaries({"rate": st.sampled_from([2.0, 5.0, 9.0])})


def build(pools, trains, serves, cap):
    lines = ["horizon: 50h"]
    if cap:
        lines.append(f"site: {{power_cap: {cap} W}}")
    lines.append("pools:")
    for i, p in enumerate(pools):
        lines.append(f"  - {{name: p{i}, chip: {p['chip']}, count: {p['count']}, price: {p['price']}, "
                     f"power_w: {p['power_w']}, pricing: {'reserved' if p['reserved'] else 'on-demand'}, "
                     f"available: {p['available']}h}}")
    lines.append("workloads:")
    for i, t in enumerate(trains):
        tokens = t["chip_hours"] * 3600 * 1000  # chip-hours at 1000 tok/s/chip (h100's rate)
        dl = f", deadline: {t['deadline']}h" if t["deadline"] else ""
        lines.append(f"  - {{name: t{i}, kind: train, model: tiny, tokens: {tokens}{dl}, chips: [{', '.join(t['chips'])}]}}")
    for i, s in enumerate(serves):
        lines.append(f"  - {{name: s{i}, kind: serve, model: tiny, rate: {s['rate']}, prompt_tokens: 32, output_tokens: 16}}")
    return parse_fleet("\n".join(lines), "prop.yaml")


def check_constraints(f, plan):
    used = {}
    for p in plan.placements:
        used[p.pool] = used.get(p.pool, 0) + p.chips
    for pool in f.pools:
        assert used.get(pool.name, 0) <= pool.count
    if f.power_cap_w:
        assert plan.peak_power_w <= f.power_cap_w * (1 + 1e-9)
    for w in f.workloads:
        mine = [p for p in plan.placements if p.workload == w.name]
        if w.kind == "train":
            assert len(mine) == 1
            p = mine[0]
            assert (not w.chips) or p.chip in w.chips
            if w.deadline_h is not None:
                assert p.finish_h <= w.deadline_h + 1e-6
            assert p.start_h >= f.pool(p.pool).available_h
        else:
            assert sum(p.figures["requests_per_s"] for p in mine) >= w.rate - 1e-9


def random_fleets(max_examples: int, max_trains: int):
    """Hypothesis over fleets: 2-5 pools, 1-max_trains training and 0-2 serving workloads, a power cap, an
    objective. `stub` is a stateless class (tests/plan/conftest.py), safe to share across examples."""
    def deco(test):
        return settings(max_examples=max_examples, deadline=None,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])(
            given(pools=st.lists(pool_st, min_size=2, max_size=5),
                  trains=st.lists(train_st, min_size=1, max_size=max_trains),
                  serves=st.lists(serve_st, max_size=2), cap=st.sampled_from([None, 5000, 15000, 40000]),
                  objective=st.sampled_from(["cost", "energy", "time"]))(test))
    return deco


@random_fleets(max_examples=40, max_trains=4)
def test_plans_respect_constraints_and_beat_greedy(stub, pools, trains, serves, cap, objective):
    f = build(pools, trains, serves, cap)
    perf = stub(rate=RATE, rps=RPS, k=K)
    plan = plan_fleet(f, perf, objective, gap=0.0)
    g = greedy(f, O.build(f, perf, objective), objective)
    if plan.status == "infeasible":
        assert g is None  # greedy never finds a plan the MILP calls infeasible
        assert plan.diagnosis
        return
    assert plan.status == "optimal"
    check_constraints(f, plan)
    if g is not None:
        check_constraints(f, g)
        tol = 1e-6 * max(1.0, abs(g.objective_value)) + 1e-6 * max(1.0, g.cost or 0.0) + 1e-6
        assert plan.objective_value <= g.objective_value + tol, (plan.objective_value, g.objective_value)


@random_fleets(max_examples=30, max_trains=5)
def test_column_generation_matches_the_direct_milp(stub, pools, trains, serves, cap, objective):
    """The large-fleet path (LP column generation, then the MILP over generated columns) must find
    the same optimum as handing HiGHS every column, and report a gap consistent with it."""
    f = build(pools, trains, serves, cap)
    perf = stub(rate=RATE, rps=RPS, k=K)
    direct = plan_fleet(f, perf, objective, gap=0.0)
    cg = plan_fleet(f, perf, objective, gap=0.0, colgen_above=0)
    assert (direct.status == "infeasible") == (cg.status == "infeasible")
    if direct.status == "infeasible":
        assert cg.diagnosis
        return
    check_constraints(f, cg)
    # The reported gap bounds the distance to the true optimum (slack 1e-4 for the tie-break terms
    # that the solver's objective carries and objective_value leaves out).
    tol = 1e-4 * max(1.0, abs(direct.objective_value))
    assert cg.objective_value >= direct.objective_value - tol
    assert cg.objective_value - direct.objective_value <= tol + (cg.gap or 0.0) * abs(cg.objective_value)

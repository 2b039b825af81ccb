"""The mixed-integer program as arrays, and two ways to solve it with HiGHS (through scipy).

Rows (each normalised so its right-hand side is 1 or 0):
  assign[w]   sum_o y_o (+ u_w)                       == 1     one option per training run
  demand[s]   sum_o rps_o / rate_s * z_o (+ v_s)       >= 1     replicas cover the request rate
  pool[p]     sum_o chips_o / count_p * x_o (- sp_p)   <= 1     pool sizes
  power       sum_o watts_o / cap * x_o (- sP)         <= 1     site power cap (when set)
  time[w]     sum_o finish_o * y_o - T                 <= 0     T is the last finish (time objective)
  cover[s]    sum_o z_o                   >= ceil(rate_s / max_o rps_o)   (valid cut: whole replicas)
u, v, sp, sP are slack columns, present only in the relaxed program used to explain infeasibility.

`solve_direct` hands the whole MILP to HiGHS (exact; used up to a few thousand options).
`solve_colgen` is for large fleets: column generation on the LP relaxation (price every option
against the LP duals, add the improving ones, repeat until none improves: the LP optimum over ALL
options), then the MILP over the generated columns. The LP optimum is a lower bound for the full
MILP, so the reported gap (incumbent - bound) / incumbent is a true optimality gap.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, linprog, milp
from scipy.sparse import csc_matrix

TIE = 1e-6


@dataclass
class Program:
    c: np.ndarray
    A: csc_matrix  # rows x columns
    row_lb: np.ndarray
    row_ub: np.ndarray
    col_ub: np.ndarray
    integrality: np.ndarray
    n_opt: int  # the first n_opt columns are options (in the caller's order)
    group: np.ndarray  # per option column: its assign/demand row (the workload)
    slack: dict = field(default_factory=dict)  # name -> column index (u:..., v:..., sp:..., sP, T)
    slack_cost_cols: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    #: Per option column, its finish time (time objective only).
    finish: np.ndarray | None = None


@dataclass
class _Rows:
    """Where each family of rows sits (the module docstring lists them, in this order)."""

    train: list  # training workload names, in option order: assign rows 0..nW-1
    serve: list  # service names: demand rows nW..nW+nS-1
    of: dict  # workload -> its assign / demand row
    pool: dict  # pool name -> its row
    power: int | None  # the power row, when the site has a cap
    time0: int | None  # first time row (time objective only), one per training run
    cover0: int  # first cover row, one per service
    n: int  # rows in all


def _rows(fleet, opts: list, objective: str) -> _Rows:
    train = list(dict.fromkeys(o.workload for o in opts if o.kind == "train"))
    serve = list(dict.fromkeys(o.workload for o in opts if o.kind == "serve"))
    nW, nS = len(train), len(serve)
    of = {w: i for i, w in enumerate(train)}
    of.update({w: nW + i for i, w in enumerate(serve)})
    pool = {p.name: nW + nS + i for i, p in enumerate(fleet.pools)}
    r = nW + nS + len(fleet.pools)
    power = None
    if fleet.power_cap_w:
        power, r = r, r + 1
    time0 = None
    if objective == "time":
        time0, r = r, r + nW
    # Valid cut: a service needs at least ceil(rate / best replica rate) replicas in total. Without
    # it the LP relaxation buys fractions of a replica and its bound is loose.
    cover0, r = r, r + nS
    return _Rows(train, serve, of, pool, power, time0, cover0, r)


class _Matrix:
    """The constraint matrix as (row, value, column) chunks; option columns first, then named extra columns
    (the time objective's T and, in the relaxed program, the slacks) with their cost, bound and integrality."""

    def __init__(self, n_opt: int):
        self.rows, self.vals, self.cols = [], [], []
        self.ncol = n_opt
        self.extra: dict = {}  # name -> column index
        self.extra_c: list[float] = []
        self.extra_ub: list[float] = []
        self.extra_int: list[int] = []

    def add(self, rows: np.ndarray, vals: np.ndarray, cols: np.ndarray) -> None:
        self.rows.append(rows)
        self.vals.append(vals)
        self.cols.append(cols)

    def add_col(self, name: str, entries: list, cost: float, ub: float, integer: int = 0) -> None:
        self.extra[name] = self.ncol
        for rr, vv in entries:
            self.add(np.array([rr]), np.array([vv]), np.array([self.ncol]))
        self.extra_c.append(cost)
        self.extra_ub.append(ub)
        self.extra_int.append(integer)
        self.ncol += 1

    def csc(self, n_rows: int) -> csc_matrix:
        return csc_matrix((np.concatenate(self.vals), (np.concatenate(self.rows), np.concatenate(self.cols))),
                          shape=(n_rows, self.ncol))


def _option_entries(m: _Matrix, fleet, opts: list, rw: _Rows, rate: dict) -> np.ndarray:
    """Each option's coefficients in the assign/demand, pool, power, cover and time rows; returns its group row."""
    n = len(opts)
    kind_train = np.array([o.kind == "train" for o in opts], dtype=bool)
    grp = np.array([rw.of[o.workload] for o in opts], dtype=np.int64)
    count = {p.name: p.count for p in fleet.pools}
    chips = np.array([o.chips / count[o.pool] for o in opts])
    prow = np.array([rw.pool[o.pool] for o in opts], dtype=np.int64)
    demand = np.array([1.0 if o.kind == "train" else o.rps / rate[o.workload] for o in opts])
    m.add(grp, demand, np.arange(n))
    m.add(prow, chips, np.arange(n))
    if rw.power is not None:
        m.add(np.full(n, rw.power), np.array([o.power_w for o in opts]) / fleet.power_cap_w, np.arange(n))
    iserv = np.nonzero(~kind_train)[0]
    if iserv.size:
        m.add(rw.cover0 + grp[iserv] - len(rw.train), np.ones(iserv.size), iserv)
    if rw.time0 is not None:
        it = np.nonzero(kind_train)[0]
        m.add(rw.time0 + grp[it], np.array([opts[i].finish_h for i in it]), it)
    return grp


def _objective(opts: list, primary: np.ndarray, tie: np.ndarray, lateness_frac: np.ndarray, objective: str,
               n_groups: int, relaxed: bool) -> tuple[np.ndarray, float]:
    """Option costs normalised so each is O(1), and the cost of the T column (time objective)."""
    if objective == "time":
        scale = max([o.finish_h for o in opts if o.kind == "train"] + [1.0])
    else:
        scale = max(float(np.abs(primary).max(initial=0.0)), 1e-9)
    # The tie-break adds at most TIE of the normalised objective in total.
    tie_w = TIE * scale * max(n_groups, 1) / max(float(np.abs(tie).sum()), 1e-12)
    c_opt = (primary + tie_w * tie) / scale
    if not relaxed:
        return c_opt, 1.0 / scale
    # Normalised slacks dominate; the objective (scaled to ~1e-6) only breaks ties among relaxations.
    return c_opt * 1e-6 / max(n_groups, 1) + lateness_frac, 1e-6 / scale / max(n_groups, 1)


def _slack_columns(m: _Matrix, fleet, rw: _Rows, need: dict) -> list[int]:
    """The relaxed program's slacks: an unplaced run, unserved requests, extra pool chips, extra power."""
    for w in rw.train:
        m.add_col(f"u:{w}", [(rw.of[w], 1.0)], 10.0, 1.0, 1)
    for w in rw.serve:
        m.add_col(f"v:{w}", [(rw.of[w], 1.0), (rw.cover0 + rw.of[w] - len(rw.train), need[w])], 10.0, 1.0)
    for p in fleet.pools:
        m.add_col(f"sp:{p.name}", [(rw.pool[p.name], -1.0)], 1.0, np.inf)
    if rw.power is not None:
        m.add_col("sP", [(rw.power, -1.0)], 1.0, np.inf)
    return [v for k, v in m.extra.items() if k != "T"]


def _row_bounds(rw: _Rows, need: dict) -> tuple[np.ndarray, np.ndarray]:
    nW, nS = len(rw.train), len(rw.serve)
    row_lb = np.full(rw.n, -np.inf)
    row_ub = np.ones(rw.n)
    row_lb[:nW] = 1.0
    row_lb[nW:nW + nS] = 1.0
    row_ub[nW:nW + nS] = np.inf
    if rw.time0 is not None:
        row_ub[rw.time0:rw.time0 + nW] = 0.0
    for i, w in enumerate(rw.serve):
        row_lb[rw.cover0 + i] = need[w]
        row_ub[rw.cover0 + i] = np.inf
    return row_lb, row_ub


def build(fleet, opts: list, primary: np.ndarray, tie: np.ndarray, lateness_frac: np.ndarray,
          objective: str, relaxed: bool) -> Program:
    """opts: training options then serving options (Option objects), coefficient arrays aligned with them."""
    rw = _rows(fleet, opts, objective)
    rate = {w.name: getattr(w, "rate", None) for w in fleet.workloads}
    best_rps: dict = {}
    for o in opts:
        if o.kind == "serve":
            best_rps[o.workload] = max(best_rps.get(o.workload, 0.0), o.rps)
    # Fewest whole replicas that cover a service's rate (the cover rows' bound).
    need = {w: np.ceil(rate[w] / best_rps[w] - 1e-9) for w in rw.serve}
    n = len(opts)
    m = _Matrix(n)
    grp = _option_entries(m, fleet, opts, rw, rate)
    c_opt, t_cost = _objective(opts, primary, tie, lateness_frac, objective, len(rw.train) + len(rw.serve), relaxed)
    if objective == "time":
        m.add_col("T", [(rw.time0 + i, -1.0) for i in range(len(rw.train))], t_cost, np.inf)
    slack_cols = _slack_columns(m, fleet, rw, need) if relaxed else []
    c = np.concatenate([c_opt, np.array(m.extra_c)])
    row_lb, row_ub = _row_bounds(rw, need)
    col_ub = np.concatenate([np.array([1.0 if o.kind == "train" else o.max_units for o in opts]), np.array(m.extra_ub)])
    integ = np.concatenate([np.ones(n), np.array(m.extra_int, dtype=float)])
    finish = np.array([o.finish_h for o in opts]) if objective == "time" else None
    return Program(c, m.csc(rw.n), row_lb, row_ub, col_ub, integ, n, grp, m.extra, np.array(slack_cols, dtype=int),
                   finish)


def _milp(p: Program, cols: np.ndarray, time_limit: float, gap: float):
    A = p.A[:, cols]
    # Rows no column touches are dropped when x = 0 satisfies them (a pool nobody uses); an
    # unsatisfiable empty row is kept so HiGHS reports the infeasibility.
    keep = (np.asarray((A != 0).sum(axis=1)).ravel() > 0) | (p.row_lb > 0) | (p.row_ub < 0)
    res = milp(p.c[cols], integrality=p.integrality[cols], bounds=Bounds(np.zeros(len(cols)), p.col_ub[cols]),
               constraints=[LinearConstraint(A[keep], p.row_lb[keep], p.row_ub[keep])] if keep.any() else [],
               options={"time_limit": max(time_limit, 0.1), "mip_rel_gap": gap, "disp": False})
    if res.x is None:
        return res, None
    x = np.zeros(p.A.shape[1])
    x[cols] = res.x
    return res, x


def solve_direct(p: Program, time_limit: float, gap: float):
    """(status, x, gap): status 0 optimal, 1 time limit with incumbent, 2 infeasible, other: failure."""
    res, x = _milp(p, np.arange(p.A.shape[1]), time_limit, gap)
    return res.status, x, getattr(res, "mip_gap", None), None


def _lp(p: Program, cols: np.ndarray):
    """LP relaxation over `cols`; returns (objective, x_cols, row duals) or None if infeasible."""
    A = p.A[:, cols].tocsr()
    eq = p.row_lb == p.row_ub
    le = ~eq & np.isfinite(p.row_ub)
    ge = ~eq & ~le  # lb finite, ub inf
    A_ub = _vstack([A[le], -A[ge]])
    b_ub = np.concatenate([p.row_ub[le], -p.row_lb[ge]])
    res = linprog(p.c[cols], A_ub=A_ub, b_ub=b_ub, A_eq=A[eq], b_eq=p.row_lb[eq],
                  bounds=np.stack([np.zeros(len(cols)), p.col_ub[cols]], axis=1), method="highs")
    if res.status != 0:
        return None
    y = np.zeros(p.A.shape[0])
    y[eq] = res.eqlin.marginals
    y[le] = res.ineqlin.marginals[: le.sum()]
    y[ge] = -res.ineqlin.marginals[le.sum():]
    return res.fun, res.x, y


def _vstack(mats):
    from scipy.sparse import vstack

    return vstack(mats, format="csr")


def colgen(p: Program, init: np.ndarray, max_iter: int = 200, per_group: int = 1, tol: float = 1e-6):
    """LP column generation from option columns `init` (slack/T columns always active).

    Returns (active columns, lower bound on the LP optimum over ALL columns, LP x over active), or
    None if the LP is infeasible. It stops when no column prices out, or when the Lagrangian bound
    (restricted optimum + sum over inactive columns of min(0, reduced cost) x upper bound; valid
    because every inactive column sits at 0 in the restricted optimum) is within `tol` of the
    restricted optimum, so the bound it returns is always valid.
    """
    fixed = np.arange(p.n_opt, p.A.shape[1])
    active = np.zeros(p.A.shape[1], dtype=bool)
    active[init] = True
    active[fixed] = True
    At = p.A[:, : p.n_opt].T.tocsr()
    for _ in range(max_iter):
        cols = np.nonzero(active)[0]
        lp = _lp(p, cols)
        if lp is None:
            return None
        obj, x, y = lp
        rc = p.c[: p.n_opt] - At @ y
        inactive = ~active[: p.n_opt]
        bound = obj + float((np.minimum(rc[inactive], 0.0) * p.col_ub[: p.n_opt][inactive]).sum())
        cand = np.nonzero((rc < -1e-9 * max(1.0, abs(obj))) & ~active[: p.n_opt])[0]
        if cand.size == 0 or obj - bound <= tol * max(1.0, abs(obj)):
            return cols, bound, x, rc
        # The most improving few columns of each workload.
        active[cand[_best_per_group(rc[cand], p.group[cand], per_group)]] = True
    return cols, bound, x, rc


def _best_per_group(score: np.ndarray, group: np.ndarray, k: int) -> np.ndarray:
    idx = np.lexsort((score, group))
    g = group[idx]
    first = np.ones(len(idx), dtype=bool)
    first[1:] = g[1:] != g[:-1]
    rank = np.arange(len(idx)) - np.maximum.accumulate(np.where(first, np.arange(len(idx)), 0))
    return idx[rank < k]


def initial_columns(p: Program, k: int = 2) -> np.ndarray:
    """The k cheapest option columns of each workload, and the k that finish first when the
    objective is time (the cheap ones are the slow ones there)."""
    cols = _best_per_group(p.c[: p.n_opt], p.group[: p.n_opt], k)
    if p.finish is not None:
        cols = np.union1d(cols, _best_per_group(p.finish, p.group, k))
    return cols


def solve_colgen(strict: Program, relaxed: Program, to_strict: np.ndarray, time_limit: float, gap: float,
                 enrich: int = 3, enrich_max: int = 50_000):
    """Phase I on the relaxed program (is the LP feasible?), phase II on the strict one.

    to_strict[j]: the strict program's column for relaxed option column j (-1: a late option the
    strict program does not have).

    Returns (status, x over the strict program or the relaxed one when infeasible, gap, which):
    which is "strict" or "relaxed".
    """
    t0 = time.perf_counter()
    r1 = colgen(relaxed, initial_columns(relaxed))
    if r1 is None:
        return 4, None, None, "relaxed"
    cols1, _, x1, _ = r1
    xs = np.zeros(relaxed.A.shape[1])
    xs[cols1] = x1
    slack_used = float(relaxed.c[relaxed.slack_cost_cols] @ xs[relaxed.slack_cost_cols]) if len(relaxed.slack_cost_cols) else 0.0
    opt_cols = to_strict[cols1[cols1 < relaxed.n_opt]]
    opt_cols = np.union1d(opt_cols[opt_cols >= 0], initial_columns(strict))
    if slack_used > 1e-7:
        res, x = _milp(relaxed, cols1, time_limit - (time.perf_counter() - t0), gap)
        return 2, x, None, "relaxed"
    r2 = colgen(strict, opt_cols)
    if r2 is None:  # cannot happen when phase I found a slack-free LP point; stay safe
        return 2, None, None, "strict"
    cols2, bound, _, rc = r2
    res, x = _milp(strict, cols2, time_limit - (time.perf_counter() - t0), gap)
    if x is None:
        if res.status == 2:  # restricted columns admit no integer plan: fall back to every column
            res, x = _milp(strict, np.arange(strict.A.shape[1]), time_limit - (time.perf_counter() - t0), gap)
            if x is None:
                return res.status, None, None, "strict"
            return res.status, x, getattr(res, "mip_gap", None), "strict"
        return res.status, None, None, "strict"
    # The LP bound holds for every column, so this gap is a true optimality gap (it also contains the
    # LP's integrality gap, so it overstates the distance to the true optimum).
    inc = float(strict.c @ x)
    g = max(0.0, (inc - bound) / max(abs(inc), 1e-12))
    # Skipped on very large programs: there the remaining gap is the LP's integrality gap (whole
    # replicas, whole runs) and another MILP costs seconds without closing it (bench/plan_solve.py).
    if g > gap and strict.n_opt <= enrich_max and time_limit - (time.perf_counter() - t0) > 1.0:
        # Price-and-branch, one more round: the MILP may need columns the LP never used. Add each
        # workload's few lowest-reduced-cost columns and keep the better incumbent.
        inactive = np.ones(strict.n_opt, dtype=bool)
        inactive[cols2[cols2 < strict.n_opt]] = False
        idx = np.nonzero(inactive)[0]
        more = idx[_best_per_group(rc[idx], strict.group[idx], enrich)]
        res4, x4 = _milp(strict, np.union1d(cols2, more), time_limit - (time.perf_counter() - t0), gap)
        if x4 is not None and float(strict.c @ x4) < inc:
            x, inc = x4, float(strict.c @ x4)
            g = max(0.0, (inc - bound) / max(abs(inc), 1e-12))
    return (0 if g <= gap + 1e-12 else 1), x, g, "strict"

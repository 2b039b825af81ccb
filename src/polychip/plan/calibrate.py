"""Fit the estimator's Calibration per chip family from records with a real step time.

Each measured or published training record is priced with the configuration it actually ran (its
`layout`, `remat` and `grad_accum`; the planner's best fitting configuration where the record gives none)
as an analytic op list. Free parameters: the compute efficiency per chip family and one memory efficiency
shared by every record (a family has too few records to pin its own), fitted jointly; link efficiency
and overlap are fixed (see LE, OV). Differences between
chips of one family come from the catalog (peaks, bandwidths, matrix-unit tile) and the op shapes, not
from a per-chip parameter fitted on one record. Each fit minimises the median relative error (the mean
breaks ties; grid search, remaining ties to the grid's middle so a parameter the records cannot see stays
neutral). `band` is the leave-one-out median |error|: each record predicted by a fit that did not see it
(a family's only record with the mean compute efficiency of the others).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace

import numpy as np

from polychip.estimate import Calibration, estimate_step
from polychip.estimate.ops import exposed_time
from polychip.estimate import analytic as A
from polychip.hardware import Chip
from polychip.plan import search as S
from polychip.plan.records import Record

CE = np.round(np.arange(0.20, 1.0001, 0.01), 2)
#: Memory efficiency also absorbs HBM traffic the analytic op list leaves out (unfused elementwise work,
#: attention's tiled re-reads of K and V, layout copies), so fits well below HBM's streaming efficiency are
#: expected; the grid reaches 0.3 because the fit sat on its earlier 0.5 edge.
ME = (0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 1.0)
#: Not fitted: every asynchronous collective in the calibration records is smaller than the compute it
#: overlaps, so no record can see these two. Link figures are taken at the catalog's value, and async
#: collectives (FSDP, data-parallel, pipeline sends, host offload) run on their own engines (TPU DMA, NCCL
#: streams) beside compute, hidden up to the compute time; blocking ones are exposed whole (Op.blocking).
LE = (1.0,)
OV = (1.0,)


@dataclass
class Priced:
    """A record with its op times at efficiency 1 (per compute op: flop time, memory time)."""

    record: Record
    tf: np.ndarray
    tm: np.ndarray
    tc: float  # asynchronous network collectives (INTRA + INTER)
    th: float  # host transfers (HOST: concurrent with the network)
    tb: float  # blocking collectives (never hidden)
    config: str


def record_ops(r: Record, chip: Chip):
    """(ops, description) of the configuration record r ran."""
    remat = r.remat_policy or r.remat
    label = f"custom ({r.remat_policy.doc})" if r.remat_policy else r.remat
    if r.layout is not None:
        a = r.grad_accum or 1
        ops = A.train_ops(r.model, r.layout, r.batch, r.seq, remat, a, chip=chip, param_dtype=r.param_dtype)
        return ops, f"{r.layout.text()}, remat {label}, {a} micro-batches (as run)"
    c = S.best(r.model, chip, r.chips, r.batch, r.seq, (r.remat,), Calibration(), param_dtype=r.param_dtype)
    if c is None:
        return None, "does not fit in the model's memory accounting"
    ops = A.train_ops(r.model, c.layout, r.batch, r.seq, remat, c.grad_accum, chip=chip, param_dtype=r.param_dtype)
    return ops, f"{c.layout.text()}, remat {label}, {c.grad_accum} micro-batches (planner's choice)"


def price_record(r: Record, chip: Chip) -> Priced | None:
    ops, text = record_ops(r, chip)
    if ops is None:
        return None
    m = A.machine(chip)
    comp = [o for o in ops if o.kind != "collective"]
    tf = np.array([o.count * o.flops / (m.peak_flops * o.peak_scale) for o in comp])
    tm = np.array([o.count * o.bytes / m.hbm_bandwidth for o in comp])
    # Collective seconds at link efficiency 1, split as estimate_step splits them.
    coll = [o for o in ops if o.kind == "collective"]
    by_link = estimate_step(coll, m).by_link
    tb = estimate_step([o for o in coll if o.blocking], m).t_collectives
    host = by_link.get(A.HOST, 0.0)
    return Priced(r, tf, tm, sum(by_link.values()) - host - tb, host, tb, text)


def _grid_times(p: Priced) -> np.ndarray:
    """Predicted step time over the whole grid [CE, ME, LE, OV] (same rule as estimate_step)."""
    tcomp = np.maximum(p.tf[None, None, :] / CE[:, None, None],
                       p.tm[None, None, :] / np.array(ME)[None, :, None]).sum(-1)  # [CE, ME]
    hidden = np.array(OV)[None, None, None, :] * tcomp[:, :, None, None]
    net, host, block = (t / np.array(LE)[None, None, :, None] for t in (p.tc, p.th, p.tb))  # [LE]
    return tcomp[:, :, None, None] + block + np.maximum(np.maximum(net - hidden, host - hidden), 0)


def _objective(errs: np.ndarray) -> np.ndarray:
    """Median |error| over records (axis 0); the mean breaks its near-ties (a median over few records
    ignores all but the middle ones)."""
    return np.median(errs, axis=0) + 0.1 * errs.mean(axis=0)


def fit_families(groups: dict[str, list[Priced]]) -> dict[str, Calibration]:
    """Memory and link efficiencies and overlap shared by every record, compute efficiency per family,
    fitted jointly: for each shared triple the family's best compute efficiency, then the triple whose
    median |error| over all records is lowest (ties to the grid's middle)."""
    fams = [f for f in groups if groups[f]]
    errs = {f: np.stack([np.abs(_grid_times(p) / p.record.step_time_s - 1) for p in groups[f]]) for f in fams}
    best_ce = {f: np.argmin(_objective(errs[f]), axis=0) for f in fams}  # [ME, LE, OV] -> CE index
    picked = np.concatenate([np.take_along_axis(errs[f], best_ce[f][None, None], axis=1)[:, 0] for f in fams])
    mid = (np.abs(np.arange(len(ME)) - len(ME) // 2)[:, None, None] + np.abs(np.arange(len(LE)) - 2)[None, :, None]
           + np.abs(np.arange(len(OV)) - 2)[None, None, :])
    j = np.unravel_index(np.argmin(_objective(picked) + 1e-6 * mid), mid.shape)
    return {f: Calibration(compute_efficiency=float(CE[best_ce[f][j]]), memory_efficiency=ME[j[0]],
                           link_efficiency=LE[j[1]], overlap=OV[j[2]]) for f in fams}


@dataclass
class LooRow:
    record: Record
    predicted_s: float
    error: float  # predicted / real - 1
    config: str


@dataclass
class TrainFit:
    """Calibrations by chip family and pooled (band = leave-one-out median |error|), with the
    leave-one-out rows."""

    by_family: dict = field(default_factory=dict)
    loo: list = field(default_factory=list)
    pooled: Calibration = field(default_factory=Calibration)

    def for_chip(self, chip: Chip) -> Calibration:
        return self.by_family.get(chip.family) or self.pooled


def predict(p: Priced, cal: Calibration) -> float:
    tcomp = float(np.maximum(p.tf / cal.compute_efficiency, p.tm / cal.memory_efficiency).sum())
    le = cal.link_efficiency
    return tcomp + p.tb / le + exposed_time(p.tc / le, p.th / le, tcomp, cal.overlap)


def _calibrations(priced: list) -> tuple[dict, Calibration]:
    """(by family, pooled) from (chip, Priced) pairs: memory / link / overlap shared by all records,
    compute efficiency per family (jointly fitted); pooled: the families' mean compute efficiency."""
    fams = sorted({c.family for c, _ in priced})
    by_fam = fit_families({f: [p for c, p in priced if c.family == f] for f in fams})
    pooled = replace(next(iter(by_fam.values())),
                     compute_efficiency=float(np.mean([c.compute_efficiency for c in by_fam.values()])))
    return by_fam, pooled


_FITS: dict = {}


def fit(records: list[Record], chips: dict[str, Chip]) -> TrainFit:
    """Fit on measured and published training records; uncalibrated where there are none.
    Fits are remembered per (records, catalog): a planner builds one per run, tests build many."""
    try:
        key = (tuple(records), tuple(sorted(chips.items())))
        hash(key)
    except TypeError:
        return _fit_records(records, chips)
    if key not in _FITS:
        _FITS[key] = _fit_records(records, chips)
    return _FITS[key]


def _priced(records: list[Record], chips: dict[str, Chip]) -> list:
    out = []
    for r in records:
        chip = chips.get(r.chip)
        if r.mode != "train" or r.source not in ("measured", "published") or chip is None:
            continue
        try:
            p = price_record(r, chip)
        except (ValueError, A.LayoutError):
            p = None
        if p is not None:
            out.append((chip, p))
    return out


def _median(xs: list) -> float | None:
    return statistics.median(xs) if xs else None


def _fit_records(records: list[Record], chips: dict[str, Chip]) -> TrainFit:
    priced = _priced(records, chips)
    out = TrainFit()
    if not priced:
        return out
    for chip, p in priced:
        rest = [(c, q) for c, q in priced if q is not p]
        if not rest:
            continue
        held = TrainFit(*_calibrations(rest))
        t = predict(p, held.for_chip(chip))
        out.loo.append(LooRow(p.record, t, t / p.record.step_time_s - 1, p.config))
    by_fam, pooled = _calibrations(priced)
    n = len(priced)
    err = {id(x.record): abs(x.error) for x in out.loo}
    for fam, cal in by_fam.items():
        mine = [p for c, p in priced if c.family == fam]
        out.by_family[fam] = replace(cal, band=_median([err[id(p.record)] for p in mine if id(p.record) in err]),
                                     source=f"compute efficiency fitted on {len(mine)} {fam} record(s); memory, "
                                            f"link and overlap on all {n}")
    out.pooled = replace(pooled, band=_median(list(err.values())),
                         source=f"mean compute efficiency of {len(by_fam)} families (no record of this family)")
    return out

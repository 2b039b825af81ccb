"""Fit the estimator's Calibration per chip family from records with a real step time.

Each measured or published training record is priced with the configuration it actually ran (its
`layout`, `remat` and `grad_accum`; the planner's best fitting configuration where the record gives none)
as an analytic op list. The fit picks compute / memory / link efficiencies and the overlap fraction that
minimise the median relative error over the family's records (grid search; ties go to the grid's middle
so a parameter the records cannot see stays neutral). `band` is the leave-one-out median |error|: each
record predicted by a fit that did not see it. A family with fewer than two records borrows the fit over
every record (and its band), and says so.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace

import numpy as np

from polychip.estimate import Calibration, machine_for
from polychip.estimate import analytic as A
from polychip.hardware import Chip
from polychip.plan import search as S
from polychip.plan.records import Record

CE = np.round(np.arange(0.20, 1.0001, 0.01), 2)
ME = (0.5, 0.7, 0.85, 1.0)
LE = (0.4, 0.55, 0.7, 0.85, 1.0)
OV = (0.0, 0.25, 0.5, 0.75, 0.9)


@dataclass
class Priced:
    """A record with its op times at efficiency 1 (per compute op: flop time, memory time)."""

    record: Record
    tf: np.ndarray
    tm: np.ndarray
    tc: float
    config: str


def record_ops(r: Record, chip: Chip):
    """(ops, description) of the configuration record r ran."""
    remat = r.remat_policy or r.remat
    if r.layout is not None:
        a = r.grad_accum or 1
        ops = A.train_ops(r.model, r.layout, r.batch, r.seq, remat, a, chip=chip, param_dtype=r.param_dtype)
        return ops, f"{r.layout.text()}, remat {r.remat}, {a} micro-batches (as run)"
    c = S.best(r.model, chip, r.chips, r.batch, r.seq, (r.remat,), Calibration(), param_dtype=r.param_dtype)
    if c is None:
        return None, "does not fit in the model's memory accounting"
    ops = A.train_ops(r.model, c.layout, r.batch, r.seq, remat, c.grad_accum, chip=chip, param_dtype=r.param_dtype)
    return ops, f"{c.layout.text()}, remat {r.remat}, {c.grad_accum} micro-batches (planner's choice)"


def price_record(r: Record, chip: Chip) -> Priced | None:
    ops, text = record_ops(r, chip)
    if ops is None:
        return None
    m = machine_for(chip)
    comp = [o for o in ops if o.kind != "collective"]
    tf = np.array([o.count * o.flops / m.peak_flops for o in comp])
    tm = np.array([o.count * o.bytes / m.hbm_bandwidth for o in comp])
    tc = 0.0
    for o in ops:
        if o.kind == "collective":
            bw = m.inter_bandwidth if o.link == A.INTER else m.intra_bandwidth
            if not bw:
                return None
            tc += o.count * o.bytes / bw
    return Priced(r, tf, tm, tc, text)


def _grid_times(p: Priced) -> np.ndarray:
    """Predicted step time over the whole grid [CE, ME, LE, OV] (same rule as estimate_step)."""
    tcomp = np.maximum(p.tf[None, None, :] / CE[:, None, None],
                       p.tm[None, None, :] / np.array(ME)[None, :, None]).sum(-1)  # [CE, ME]
    coll = p.tc / np.array(LE)  # [LE]
    exposed = np.maximum(coll[None, None, :, None] - np.array(OV)[None, None, None, :] * tcomp[:, :, None, None], 0)
    return tcomp[:, :, None, None] + exposed


def _fit(priced: list[Priced]) -> Calibration:
    errs = np.stack([np.abs(_grid_times(p) / p.record.step_time_s - 1) for p in priced])
    med = np.median(errs, axis=0)
    # Ties (parameters the records cannot see) go to the middle of the grid.
    mid = (np.abs(np.arange(len(ME)) - 2)[None, :, None, None] + np.abs(np.arange(len(LE)) - 2)[None, None, :, None]
           + np.abs(np.arange(len(OV)) - 2)[None, None, None, :])
    i = np.unravel_index(np.argmin(med + 1e-6 * mid), med.shape)
    return Calibration(compute_efficiency=float(CE[i[0]]), memory_efficiency=ME[i[1]], link_efficiency=LE[i[2]],
                       overlap=OV[i[3]], band=None, source="")


@dataclass
class LooRow:
    record: Record
    predicted_s: float
    error: float  # predicted / real - 1
    config: str


@dataclass
class TrainFit:
    """family -> Calibration (band = leave-one-out median |error|), with the leave-one-out rows."""

    by_family: dict = field(default_factory=dict)
    loo: list = field(default_factory=list)
    pooled: Calibration = field(default_factory=Calibration)

    def for_chip(self, chip: Chip) -> Calibration:
        return self.by_family.get(chip.family, self.pooled)


def predict(p: Priced, cal: Calibration) -> float:
    tcomp = float(np.maximum(p.tf / cal.compute_efficiency, p.tm / cal.memory_efficiency).sum())
    return tcomp + max(p.tc / cal.link_efficiency - cal.overlap * tcomp, 0.0)


def fit(records: list[Record], chips: dict[str, Chip]) -> TrainFit:
    """Fit per family on measured and published training records; uncalibrated where there are none."""
    priced = []
    for r in records:
        chip = chips.get(r.chip)
        if r.mode != "train" or r.source not in ("measured", "published") or chip is None:
            continue
        try:
            p = price_record(r, chip)
        except (ValueError, A.LayoutError):
            p = None
        if p is not None:
            priced.append((chip.family, p))
    out = TrainFit()
    if not priced:
        return out
    everything = [p for _, p in priced]
    for fam in sorted({f for f, _ in priced}):
        mine = [p for f, p in priced if f == fam]
        pool = mine if len(mine) >= 2 else everything
        for p in mine:
            rest = [q for q in pool if q is not p] or [q for q in everything if q is not p]
            if rest:
                t = predict(p, _fit(rest))
                out.loo.append(LooRow(p.record, t, t / p.record.step_time_s - 1, p.config))
        fam_rows = [abs(x.error) for x in out.loo if chips[x.record.chip].family == fam]
        band = statistics.median(fam_rows) if fam_rows else None
        how = f"{len(mine)} {fam} record(s)" if pool is mine else f"all {len(everything)} records ({len(mine)} on {fam})"
        out.by_family[fam] = replace(_fit(pool), band=band, source=f"fitted on {how}")
    allrows = [abs(x.error) for x in out.loo]
    out.pooled = replace(_fit(everything), band=statistics.median(allrows) if allrows else None,
                         source=f"fitted on all {len(everything)} records (no record of this chip family)")
    return out

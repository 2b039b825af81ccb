"""Performance model: how fast a workload runs on n chips of a kind, and where that figure came from.

Training: one step is the analytic op list of the configuration (polychip.estimate.analytic) priced by
the estimator `compile` also uses (polychip.estimate.estimate_step), with the Calibration fitted per
chip family on measured and published records (plan/calibrate.py; its band is the leave-one-out median
error). The planner searches the configuration space (plan/search.py) for the fastest that fits. Source
order: a measured record of this model, sequence, batch and chip count on this chip > a compiler record
of the same (`polychip compile`; used as is, so both report one step time) > such a record of another
chip count or batch, scaled by the estimator's ratio > the calibrated estimate.

Serving: a prefill of one prompt and a decode step at batch B are analytic op lists too
(analytic.serve_ops: weights and KV cache read, matmuls, blocking tensor-parallel all-reduces) priced by
estimate_step at efficiency 1 (a per-op roofline), then divided by a serving efficiency factor: the
geometric mean over matching serving records, else the chip's, its family's, every record's, else
DEFAULT_EFFICIENCY, and the detail says which. Memory fit and KV capacity: plan/roofline.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from polychip.estimate import estimate_step
from polychip.estimate import analytic as A
from polychip.hardware import Chip
from polychip.model import flops as F
from polychip.plan import calibrate as C
from polychip.plan import roofline as R
from polychip.plan import search as S
from polychip.plan.records import Record

#: Used only when no record at all can calibrate: the middle of the published 33-65% MFU range.
DEFAULT_EFFICIENCY = 0.5
#: Serving decode batch ceiling (vLLM's default max_num_seqs is 256; beyond it gains are small).
MAX_DECODE_BATCH = 256


@dataclass(frozen=True)
class Efficiency:
    value: float
    detail: str
    n_records: int = 0


@dataclass
class Calibration:
    """Efficiency factors fitted from records, looked up per (mode, chip)."""

    #: (mode, chip name) -> list of (efficiency, source) per record.
    per_chip: dict = field(default_factory=dict)
    families: dict = field(default_factory=dict)

    @classmethod
    def fit(cls, records: list[Record], chips: dict[str, Chip]) -> "Calibration":
        """Serving efficiencies (training is calibrated by plan/calibrate.py)."""
        cal = cls()
        for r in records:
            if r.mode != "serve":
                continue
            chip = chips.get(r.chip)
            if chip is None or chip.peak("bfloat16") is None or chip.hbm_bandwidth is None:
                continue
            eff = record_efficiency(r, chip)
            if eff is None or not (eff > 0 and math.isfinite(eff)):
                continue
            cal.per_chip.setdefault((r.mode, chip.name), []).append((eff, r.source))
            cal.families[chip.name] = chip.family
        return cal

    def efficiency(self, mode: str, chip: Chip) -> Efficiency:
        def gmean(vals):
            return math.exp(sum(math.log(v) for v in vals) / len(vals))

        own = self.per_chip.get((mode, chip.name), [])
        for src in ("measured", "compiler", "published"):
            vals = [e for e, s in own if s == src]
            if vals:
                return Efficiency(gmean(vals), f"eff {gmean(vals):.2f} fitted from {len(vals)} {src} "
                                               f"{mode} record(s) on {chip.name}", len(vals))
        fam = [e for (m, c), lst in self.per_chip.items() if m == mode and self.families.get(c) == chip.family
               for e, _ in lst]
        if fam:
            return Efficiency(gmean(fam), f"eff {gmean(fam):.2f} fitted from {len(fam)} {mode} record(s) on other "
                                          f"{chip.family} chips (none on {chip.name})", len(fam))
        every = [e for (m, _), lst in self.per_chip.items() if m == mode for e, _ in lst]
        if every:
            return Efficiency(gmean(every), f"eff {gmean(every):.2f} fitted from {len(every)} {mode} record(s) on "
                                            f"other chip families (none on {chip.family})", len(every))
        return Efficiency(DEFAULT_EFFICIENCY, f"eff {DEFAULT_EFFICIENCY} UNCALIBRATED default (no {mode} records)")


def record_efficiency(r: Record, chip: Chip) -> float | None:
    """Serving: roofline requests/s / real requests/s for one record (the record's own setup)."""
    cfg = best_serve_config(r.model, chip, r.prompt_tokens, r.output_tokens, r.dtype, 1.0, None, None,
                            ks=[r.chips], batch=r.batch)
    if cfg is None:
        return None
    return r.requests_per_s / cfg.rps


@dataclass(frozen=True)
class TrainEstimate:
    chip: str
    n_chips: int
    step_time_s: float
    tokens_per_s: float
    mfu: float
    source: str  # measured | compiler | estimate
    detail: str
    remat: str
    dp: int
    tp: int
    grad_accum: int
    bound: str
    hbm_bytes_per_chip: float
    layout: A.Layout | None = None
    #: Validated relative error of the estimate (leave-one-out median over its calibration records).
    band: float | None = None


@dataclass(frozen=True)
class ServeConfig:
    """Best replica for one service on one chip kind."""

    chip: str
    k: int  # chips per replica
    batch: int
    ttft_s: float
    tpot_s: float
    rps: float  # requests/s one replica sustains
    source: str = "roofline"
    detail: str = ""


def serve_bound(cfg, chip: Chip, k: int, batch: int, prompt: int, output: int, dtype: str) -> R.ServeBound | None:
    """roofline.serve_bound's memory figures with step times from the shared estimator over
    analytic.serve_ops (prefill: one prompt; decode: `batch` sequences at the mean context). None when
    k chips' devices are not a tensor degree the heads allow, or a collective has no link figure."""
    sb = R.serve_bound(cfg, chip, k, batch, prompt, output, dtype)
    t, wb, ctx = k * chip.devices_per_chip, 1 if dtype == "float8" else 2, prompt + output / 2
    try:
        m = A.machine(chip, dtype if chip.peak(dtype) else "bfloat16")
        pre = estimate_step(A.serve_ops(cfg, t, 1, prompt, (prompt + 1) / 2, prompt, wb, chip), m).t_step
        dec = estimate_step(A.serve_ops(cfg, t, batch, 1, ctx, ctx, wb, chip), m).t_step
    except ValueError:  # analytic.LayoutError included
        return None
    return replace(sb, t_prefill=pre, t_decode=dec)


def best_serve_config(cfg, chip: Chip, prompt: int, output: int, dtype: str, eff: float,
                      ttft: float | None, tpot: float | None, ks: list[int] | None = None,
                      batch: int | None = None) -> ServeConfig | None:
    """The (k, batch) with the most requests/s per chip that meets the latency targets, else None."""
    if ks is None:
        kmax = 64 if chip.family == "tpu" else max(1, chip.chips_per_host)
        ks = R.pow2_upto(kmax)
    best = None
    for k in ks:
        fit = R.max_fit_batch(cfg, chip, k, prompt, output, dtype)
        if fit < 1:
            continue
        batches = [min(batch, fit)] if batch else R.pow2_upto(min(fit, MAX_DECODE_BATCH))
        if not batch and fit < MAX_DECODE_BATCH and fit not in batches:
            batches.append(fit)
        for b in batches:
            sb = serve_bound(cfg, chip, k, b, prompt, output, dtype)
            if sb is None:
                break
            t1, t2, rps = sb.at_efficiency(eff, output)
            if (ttft is not None and t1 > ttft) or (tpot is not None and t2 > tpot):
                continue
            cand = ServeConfig(chip.name, k, b, t1, t2, rps)
            if best is None or cand.rps / k > best.rps / best.k * (1 + 1e-9):
                best = cand
    return best


def fastest_serve_latency(cfg, chip: Chip, prompt: int, output: int, dtype: str, eff: float) -> tuple[float, float] | None:
    """(best TTFT, best TPOT) any replica reaches: batch 1 at the widest replica that fits."""
    kmax = 64 if chip.family == "tpu" else max(1, chip.chips_per_host)
    best = None
    for k in R.pow2_upto(kmax):
        if R.max_fit_batch(cfg, chip, k, prompt, output, dtype) < 1:
            continue
        sb = serve_bound(cfg, chip, k, 1, prompt, output, dtype)
        if sb is None:
            continue
        t1, t2, _ = sb.at_efficiency(eff, output)
        best = (t1, t2) if best is None else (min(best[0], t1), min(best[1], t2))
    return best


def _band(cal) -> str:
    return "band n/a (uncalibrated)" if cal.band is None else f"band +/-{cal.band:.0%}"


def _train_estimate(w, chip: Chip, n: int, t: float, src: str, detail: str, remat: str, lay, a: int, bound: str,
                    need: float, cal) -> TrainEstimate:
    """A TrainEstimate of step time t (tokens/s and MFU from the workload; the band only on estimates)."""
    mfu = F.mfu(F.train_flops_per_step(w.model, w.batch, w.seq_len), t, n, chip.peak("bfloat16"))
    return TrainEstimate(chip.name, n, t, w.batch * w.seq_len / t, mfu, src, detail, remat,
                         lay.fsdp * lay.data if lay else n, lay.tensor if lay else 1, a, bound, need,
                         layout=lay, band=cal.band if src == "estimate" else None)


class PerfModel:
    """Estimates with provenance. `records`: measured/compiler/published records; `chips`: name -> Chip."""

    def __init__(self, records: list[Record], chips: dict[str, Chip], calibration: Calibration | None = None,
                 train_fit: C.TrainFit | None = None):
        self.chips = chips
        self.direct = [r for r in records if r.source in ("measured", "compiler")]
        self.calibration = calibration if calibration is not None else Calibration.fit(records, chips)
        self.train_fit = train_fit if train_fit is not None else C.fit(records, chips)
        self._train_cache: dict = {}
        self._serve_cache: dict = {}

    # -- training ---------------------------------------------------------------------------------
    def train(self, w, chip: Chip, n: int) -> TrainEstimate | None:
        """Step time of training workload `w` on n chips, or None if it cannot run (memory, split)."""
        key = (w.model, w.seq_len, w.batch, w.remat, w.max_tensor, w.dtype, w.layout, w.grad_accum, chip.name, n)
        if key not in self._train_cache:
            self._train_cache[key] = self._train(w, chip, n)
        return self._train_cache[key]

    def _direct(self, w, chip: Chip, n: int, remats: tuple) -> Record | None:
        """The closest measured, else compiler, record of this model and sequence on this chip."""
        for src in ("measured", "compiler"):
            recs = [r for r in self.direct if r.source == src and r.mode == "train" and r.chip == chip.name
                    and r.model == w.model and r.seq == w.seq_len and r.remat in remats]
            if recs:
                return min(recs, key=lambda r: (abs(math.log(r.chips / n)) + abs(math.log(r.batch / w.batch))))
        return None

    def _train(self, w, chip: Chip, n: int) -> TrainEstimate | None:
        remats = S.REMAT_ORDER if w.remat == "auto" else (w.remat,)
        cal = self.train_fit.for_chip(chip)
        if w.layout is not None:
            return self._train_in_layout(w, chip, n, remats, cal)
        try:
            # bf16 weights: the configuration launch.py writes (train.param_dtype=bfloat16).
            choice = S.best(w.model, chip, n, w.batch, w.seq_len, remats, cal, max_tensor=w.max_tensor,
                            param_dtype="bfloat16", dtype=w.dtype)
        except ValueError:  # the chip has no link figure for a collective every layout needs
            choice = None
        r = self._direct(w, chip, n, remats)
        if r is not None and r.chips == n and r.batch == w.batch and w.dtype == "bfloat16":
            # The run itself was measured or compiled: its step time and its configuration.
            lay = r.layout or (choice.layout if choice else None)
            a = r.grad_accum or (choice.grad_accum if choice else 1)
            t, remat, src = r.step_time_s, r.remat, r.source
            detail = f"{src} record: {n} chips, batch {r.batch}, {lay.text() if lay else 'layout not recorded'}"
            need = choice.hbm_bytes if choice else 0.0
            bound = choice.est.bound if choice else "n/a"
        elif choice is None:
            return None
        else:
            lay, a, remat, need = choice.layout, choice.grad_accum, choice.remat, choice.hbm_bytes
            t, src, bound = choice.est.t_step, "estimate", choice.est.bound
            detail = (f"{lay.text()}, remat {remat}, {a} micro-batches, {bound}-bound; "
                      f"calibration {cal.source}, {_band(cal)}")
            ref = self._record_estimate(r, chip, cal) if r is not None else None
            if ref:
                t, src = r.step_time_s * t / ref, r.source
                detail = (f"{r.source} record ({r.chips} chips, batch {r.batch}) scaled to {n} chips / batch "
                          f"{w.batch} by the estimator's ratio; " + detail)
        return _train_estimate(w, chip, n, t, src, detail, remat, lay, a, bound, need, cal)

    def _train_in_layout(self, w, chip: Chip, n: int, remats: tuple, cal) -> TrainEstimate | None:
        """The workload's own layout on n chips (None unless it takes exactly n chips' devices)."""
        if w.layout.devices != n * chip.devices_per_chip:
            return None
        lay = replace(w.layout, nodes=S.nodes_for(chip, n))
        try:
            c = S.best_in_layout(w.model, chip, lay, w.batch, w.seq_len, remats, cal, w.grad_accum,
                                 param_dtype="bfloat16", dtype=w.dtype)
        except (ValueError, A.LayoutError):  # cannot split this model / batch, or no link figure
            return None
        fit = "" if c.fits else "; DOES NOT FIT the memory model (priced as given)"
        detail = (f"{lay.text()} (as given), remat {c.remat}, {c.grad_accum} micro-batches, {c.est.bound}-bound"
                  f"{fit}; calibration {cal.source}, {_band(cal)}")
        return _train_estimate(w, chip, n, c.est.t_step, "estimate", detail, c.remat, lay, c.grad_accum, c.est.bound,
                               c.hbm_bytes, cal)

    def _record_estimate(self, r: Record, chip: Chip, cal) -> float | None:
        """The estimator's step time for the configuration record r ran (same calibration)."""
        from polychip.estimate import estimate_step

        try:
            ops, _ = C.record_ops(r, chip)
        except (ValueError, A.LayoutError):
            return None
        return None if ops is None else estimate_step(ops, A.machine(chip), cal).t_step

    # -- serving ----------------------------------------------------------------------------------
    def serve_efficiency(self, s, chip: Chip) -> tuple[float, str, str]:
        recs = [r for r in self.direct if r.mode == "serve" and r.chip == chip.name and r.model == s.model
                and r.prompt_tokens == s.prompt_tokens and r.output_tokens == s.output_tokens and r.dtype == s.dtype]
        for src in ("measured", "compiler"):
            for r in recs:
                if r.source == src:
                    e = record_efficiency(r, chip)
                    if e:
                        return e, src, f"roofline with eff {e:.2f} from a {src} record of this service shape"
        eff = self.calibration.efficiency("serve", chip)
        return eff.value, "roofline", eff.detail

    def serve(self, s, chip: Chip) -> ServeConfig | None:
        key = (s.model, s.prompt_tokens, s.output_tokens, s.dtype, s.ttft_s, s.tpot_s, chip.name)
        if key not in self._serve_cache:
            eff, src, detail = self.serve_efficiency(s, chip)
            c = best_serve_config(s.model, chip, s.prompt_tokens, s.output_tokens, s.dtype, eff, s.ttft_s, s.tpot_s)
            if c is not None:
                c = ServeConfig(c.chip, c.k, c.batch, c.ttft_s, c.tpot_s, c.rps, src, detail)
            self._serve_cache[key] = c
        return self._serve_cache[key]

    def serve_unreachable(self, s, chip: Chip) -> str:
        """Why no replica config meets the service's targets on this chip."""
        eff, _, _ = self.serve_efficiency(s, chip)
        best = fastest_serve_latency(s.model, chip, s.prompt_tokens, s.output_tokens, s.dtype, eff)
        if best is None:
            return f"{chip.name}: weights + one sequence's KV cache do not fit on any replica width"
        parts = []
        if s.ttft_s is not None and best[0] > s.ttft_s:
            parts.append(f"TTFT target {s.ttft_s * 1e3:.0f} ms, best {best[0] * 1e3:.0f} ms")
        if s.tpot_s is not None and best[1] > s.tpot_s:
            parts.append(f"TPOT target {s.tpot_s * 1e3:.1f} ms, best {best[1] * 1e3:.1f} ms")
        return f"{chip.name}: " + ("; ".join(parts) or "targets met only separately, not at one batch size")

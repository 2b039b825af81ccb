"""How close the planner's training step time is to published measurements (labelled: estimates vs published).

Two tables:
  1. leave-one-out over the calibration records (polychip/plan/published.py): each record predicted by
     a calibration fitted without it;
  2. out of sample (bench/plan_oos.yaml): published configurations the calibration never saw, priced
     with the layout and remat their source gives (else the planner's own fastest fitting choice).
Prints predicted vs published tokens/s per chip and the median |error| of each table. fp8 rows are priced
with fp8 linear layers (estimate.analytic.fp8_rate: the chip's fp8 peak over its bf16 peak, the same
calibration, which is fitted on bf16 runs); their median is printed apart and with the rest.

    PYTHONPATH=src JAX_PLATFORMS=cpu .venv/bin/python bench/plan_accuracy.py [--oos bench/plan_oos.yaml] [--loo-only]

Change the model with --loo-only (calibration records only); run the out-of-sample table once, after.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import yaml

from polychip.estimate import analytic as A
from polychip.hardware import load_catalog
from polychip.plan import calibrate as C
from polychip.plan import search as S
from polychip.plan.published import CUSTOM_REMAT, MODELS, published_train_records


def _remat(text: str):
    """(remat for the search, label): a policy name, custom:<name>, or auto."""
    if text == "auto":
        return S.REMAT_ORDER, "auto"
    if text.startswith("custom:"):
        return (CUSTOM_REMAT[text.split(":", 1)[1]],), text
    return (text,), text


def predict_row(row: dict, cat: dict, fit: C.TrainFit) -> tuple[float, str]:
    """(predicted seconds per step, configuration used) for one out-of-sample row."""
    chip = cat[row["chip"]]
    cfg = MODELS[row["model"]]
    cal = fit.for_chip(chip)
    remats, label = _remat(row["remat"])
    dtype = {"bf16": "bfloat16", "fp8": "float8"}[row.get("precision", "bf16")]
    if "layout" in row:
        best = S.best_in_layout(cfg, chip, A.Layout(**row["layout"]), row["batch"], row["seq"], remats, cal,
                                row.get("grad_accum"), dtype=dtype)
        how = "layout as published" + ("" if best.fits else "; DOES NOT FIT the planner's memory model")
    else:
        best = S.best(cfg, chip, row["chips"], row["batch"], row["seq"], remats, cal, dtype=dtype)
        how = "planner's layout"
        if best is None:
            raise SystemExit(f"{row['name']}: nothing fits in the planner's memory model")
    return best.est.t_step, f"{best.layout.text()}, remat {best.remat if label == 'auto' else label}, " \
                            f"{best.grad_accum} micro-batches ({how}); {best.est.bound}-bound"


def published_tps(row: dict) -> float:
    if "tokens_per_s_per_chip" in row:
        return float(row["tokens_per_s_per_chip"])
    return row["batch"] * row["seq"] / row["step_time_s"] / row["chips"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--oos", default=str(Path(__file__).with_name("plan_oos.yaml")))
    ap.add_argument("--loo-only", action="store_true",
                    help="print the calibration and leave-one-out table only (while changing the model, so that "
                         "no decision sees the out-of-sample rows)")
    args = ap.parse_args()
    cat = load_catalog()
    fit = C.fit(published_train_records(), cat)
    print("calibration (estimate; fitted on published records):")
    for name, cal in fit.by_family.items():
        print(f"  {name:11s} compute {cal.compute_efficiency:.2f} memory {cal.memory_efficiency:.2f} "
              f"link {cal.link_efficiency:.2f} overlap {cal.overlap:.2f}  band {cal.band:.1%}")
    print("\n1. leave-one-out over the calibration records (tokens/s/chip: estimate vs published)")
    for x in fit.loo:
        r = x.record
        real = r.batch * r.seq / r.step_time_s / r.chips
        print(f"  {r.chip:11s} {r.model_name:11s} {r.chips:5d} chips  est {real / (1 + x.error):8.0f}  "
              f"pub {real:8.0f}  {x.error:+6.1%}  [{x.config}]")
    print(f"  median |error| {statistics.median(abs(x.error) for x in fit.loo):.1%} over {len(fit.loo)} records")
    if args.loo_only:
        return
    rows = yaml.safe_load(Path(args.oos).read_text())["rows"]
    print("\n2. out of sample (tokens/s/chip: estimate vs published)")
    errs = {"bf16": [], "fp8": []}
    for row in rows:
        t, how = predict_row(row, cat, fit)
        est = row["batch"] * row["seq"] / t / row["chips"]
        real = published_tps(row)
        err = est / real - 1
        errs[row.get("precision", "bf16")].append(abs(err))
        print(f"  {row['name']:34s} est {est:8.0f}  pub {real:8.0f}  {err:+6.1%}  {row.get('precision', 'bf16')}  [{how}]")
    for prec, e in errs.items():
        if e:
            print(f"  {prec} rows: median |error| {statistics.median(e):.1%} over {len(e)}")
    every = [x for e in errs.values() for x in e]
    print(f"  all rows: median |error| {statistics.median(every):.1%} over {len(every)}")


if __name__ == "__main__":
    main()

"""Predicted vs published MFU of Google MaxText's recipes, and the estimator's calibration fitted on them.

Reads the optimised HLO that bench/maxtext/compile_recipes.py cached (<cache>/maxtext/<recipe>/), turns it
into ops with polychip.estimate.hlo.ops_from_hlo, costs it with estimate_step on the catalog chip, and
compares with the recipe's measured step time (bench/maxtext/recipes.yaml, every figure with its source).

MFU convention: MaxText 0.2.4's own training FLOPs per device (calculate_tflops_training_per_device, causal
attention), recorded in each recipe's meta.json, over (step seconds x catalog bf16 peak). Published and
predicted MFU use the same FLOPs and peak, so their relative error is measured step / predicted step - 1;
the "quoted" column is the MFU as the source printed it (older sources count attention non-causally).

The ops are exactly what `compile` costs: the same HLO walk, and the same Machine (estimate.analytic.machine:
the catalog chip with its host link, so offloaded remat tensors, HOST ops, are priced over PCIe as in
`compile` and `plan`). MaxText's splash-attention kernels declare no cost; their FLOPs are inferred from
q / k shapes (estimate.kernels) with causal masking, which every recipe here uses (MaxText's decoders are
causal). Not visible in the HLO: sliding-window masks (Gemma3's local layers), counted as causal.

"hostGB": host-memory arrays carried by the step's loops (offloaded remat tensors), for reference;
"host s": the HOST ops' seconds at the catalog host link (uncalibrated).
"chk" is the source's TFLOP/s x step seconds over MaxText 0.2.4's count in the source's convention: 1.00
means the compiled settings are the measured ones.

Columns: uncalibrated (roofline, all efficiencies 1), fitted (the fit on all recipes, in-sample),
leave-one-out (each recipe predicted by the fit on the others) and nested (the model family of
calibration.FAMILIES also chosen without the recipe: the honest error, since the family is picked by
leave-one-out error). `--write` stores the fit with band = nested leave-one-out median |error| in
src/polychip/estimate/calibration.json.

    PYTHONPATH=src /work/main/.venv/bin/python bench/estimate_calibration.py [--write] [--collectives]
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import yaml

from polychip.estimate import calibration as C
from polychip.estimate.analytic import machine
from polychip.estimate.hlo import ops_from_hlo
from polychip.estimate.ops import HOST, Calibration, estimate_step
from polychip.files import cache_dir
from polychip.hardware.catalog import get_chip

RECIPES = Path(__file__).resolve().parent / "maxtext" / "recipes.yaml"
HLO_NAME = "train_step.after_optimizations.txt"  # as bench/maxtext/compile_recipes.py writes it


def source_tflop(r: dict, meta: dict) -> float:
    """MaxText's TFLOP per device per step for this recipe in its source's attention convention."""
    fl = meta["maxtext_tflops_per_device"]
    causal = r["published"].get("attention_flops", "causal") == "causal"
    return fl["total"] if causal else fl["weights"] + 2 * fl["attention_causal"]


_HOST_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]\{[^}]*S\(5\)[^}]*\}")
_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}


def host_loop_bytes(text: str) -> float:
    """Bytes of host-memory (layout S(5)) arrays carried by while loops, summed over loops: the remat
    tensors MaxText offloads. A diagnostic: the estimator costs the DMAs that move them (HOST ops)."""
    total = 0.0
    for line in text.splitlines():
        if " while(" not in line:
            continue
        head = line.split(" while(", 1)[0]
        for dt, dims in _HOST_ARRAY.findall(head):
            total += math.prod(int(d) for d in dims.split(",") if d) * _BYTES.get(dt, 2)
    return total


def measured_step(r: dict, meta: dict) -> tuple[float, str, float | None]:
    """The recipe's measured step seconds, how they follow from what its source printed, and a check: the
    source's TFLOP/s x step seconds over MaxText's count in the source's convention (1.00 when the compiled
    settings are the ones that were measured; None when the source gives no both)."""
    pub = r["published"]
    tflop = source_tflop(r, meta)
    if "step_seconds" in pub:
        t, how = float(pub["step_seconds"]), "step log"
    elif "tokens_per_s_per_device" in pub:
        t, how = meta["per_device_batch_size"] * meta["seq"] / pub["tokens_per_s_per_device"], "tokens/s"
    else:
        conv = pub.get("attention_flops", "causal")
        return tflop / pub["tflops_per_device"], f"TFLOP/s ({conv} attention)", None
    check = pub["tflops_per_device"] * t / tflop if "tflops_per_device" in pub else None
    return t, how, check


def load_recipes(names: list[str] | None) -> list[dict]:
    """The compiled recipes: their yaml entry, meta.json, ops and machine. Uncompiled ones are listed."""
    recipes = yaml.safe_load(RECIPES.read_text())["recipes"]
    if names and (bad := [n for n in names if n not in recipes]):
        raise SystemExit(f"unknown recipe(s): {', '.join(bad)}; known: {', '.join(recipes)}")
    rows = []
    for name in names or recipes:
        d = cache_dir("maxtext") / name
        meta = json.loads((d / "meta.json").read_text()) if (d / "meta.json").exists() else None
        if not meta or meta.get("status") != "ok" or not (d / HLO_NAME).exists():
            print(f"  {name}: not compiled ({meta['status'] if meta else 'no meta.json'}); skipped")
            continue
        r = recipes[name]
        dps = meta["devices_per_slice"] if meta["num_slices"] > 1 else None
        t0 = time.perf_counter()
        text = (d / HLO_NAME).read_text()
        ops = ops_from_hlo(text, meta["n_devices"], dps, attention_causal=True)
        m = machine(get_chip(r["chip"]))
        t_meas, how, check = measured_step(r, meta)
        rows.append({"name": name, "r": r, "meta": meta, "ops": ops, "machine": m, "measured": t_meas,
                     "how": how, "check": check, "host_bytes": host_loop_bytes(text), "flops": meta["maxtext_tflops_per_device"]["total"] * 1e12,
                     "parse_s": time.perf_counter() - t0})
    return rows


def mfu(row: dict, t: float) -> float:
    return row["flops"] / (t * row["machine"].peak_flops)


def collective_totals(ops) -> dict:
    """Bytes one device sends per step, by (collective, link)."""
    tot: dict = defaultdict(float)
    for o in ops:
        if o.kind == "collective":
            tot[(o.collective or o.name, o.link)] += o.bytes * o.count
    return dict(tot)


def _fmt_err(e: float) -> str:
    return f"{e:+6.1%}"


def print_table(rows: list[dict], pairs: list, fitted: Calibration | None, loo: list | None,
                nested: list | None = None) -> dict:
    """The comparison table; returns the per-recipe numbers for the stored record."""
    hdr = (f"{'recipe':24s} {'quoted':>7s} {'chk':>4s} {'step s':>7s} {'MFU':>6s} | {'uncal':>6s} {'err':>7s} | "
           f"{'fitted':>6s} {'err':>7s} | {'LOO':>6s} {'err':>7s} | {'nested':>7s} | {'hostGB':>6s} | bound (uncal)")
    print(hdr + "\n" + "-" * len(hdr))
    errs: dict = defaultdict(list)
    out = []
    for i, (row, p) in enumerate(zip(rows, pairs)):
        est = estimate_step(row["ops"], row["machine"], Calibration())
        cols = {"uncal": est.t_step}
        if fitted is not None:
            cols["fitted"] = C.predict(p, fitted)
        if loo is not None:
            cols["loo"] = C.predict(p, loo[i][0])
        chk = f"{row['check']:4.2f}" if row["check"] is not None else "  - "
        line = (f"{row['name']:24s} {row['r']['published']['mfu']:7.2%} {chk} {row['measured']:7.3f} "
                f"{mfu(row, row['measured']):6.1%}")
        rec = {"recipe": row["name"], "measured_step_s": row["measured"], "measured_from": row["how"],
               "mfu_maxtext_0_2_4": mfu(row, row["measured"]), "quoted_mfu": row["r"]["published"]["mfu"],
               "flops_check": row["check"], "hbm_bytes": row["meta"].get("hbm_bytes"),
               "host_loop_bytes": row["host_bytes"]}
        for k in ("uncal", "fitted", "loo"):
            if k in cols:
                e = C.rel_error(row["measured"], cols[k])
                errs[k].append(abs(e))
                line += f" | {mfu(row, cols[k]):6.1%} {_fmt_err(e)}"
                rec[f"predicted_step_s_{k}"], rec[f"error_{k}"] = cols[k], e
            else:
                line += f" | {'':6s} {'':7s}"
        if nested is not None:
            rec["error_nested_loo"] = nested[i]
            errs["nested"].append(abs(nested[i]))
            line += f" | {_fmt_err(nested[i]):>7s}"
        walk_flops = sum(o.flops * o.count for o in row["ops"])
        rec["walk_flops_over_maxtext"] = walk_flops / row["flops"]
        print(line + f" | {row['host_bytes'] / 1e9:6.0f} | {est.bound} (comp {est.t_flops:.2f} s, hbm {est.t_memory:.2f} s, "
                     f"coll {est.t_collectives - est.by_link.get(HOST, 0.0):.2f} s, host {est.by_link.get(HOST, 0.0):.2f} s; "
                     f"FLOPs {rec['walk_flops_over_maxtext']:.2f}x MaxText's)")
        out.append(rec)
    med = " ".join(f"{k} {statistics.median(v):.1%}" for k, v in errs.items())
    print(f"median |MFU error|: {med}")
    return {"rows": out, "median_abs_error": {k: statistics.median(v) for k, v in errs.items()}}


def print_collectives(rows: list[dict]) -> None:
    print("\ncollective bytes per device per step (compiled HLO, ring-algorithm bytes sent):")
    for row in rows:
        tot = collective_totals(row["ops"])
        parts = ", ".join(f"{k[0]} {k[1]} {v / 1e9:.2f} GB" for k, v in sorted(tot.items()))
        print(f"  {row['name']:24s} total {sum(tot.values()) / 1e9:.2f} GB: {parts}")


def per_generation(rows: list[dict], pairs: list, family: str, nested: list) -> dict:
    """Would a calibration per chip generation (v6e, v5p) predict better? Each generation's recipes fitted
    on their own (the chosen family), leave-one-out within the generation, against the pooled nested
    errors of the same recipes. A generation with 2 recipes predicts each from one other: too few to trust."""
    out = {}
    for chip in sorted({r["r"]["chip"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["r"]["chip"] == chip]
        own = [e for _, e in C.calibrate([pairs[i] for i in idx], C.FAMILIES[family])[1]] if len(idx) >= 2 else []
        pooled = [abs(nested[i]) for i in idx]
        out[chip] = {"recipes": len(idx), "own_fit_loo_median": statistics.median(map(abs, own)) if own else None,
                     "pooled_nested_median": statistics.median(pooled)}
        own_txt = f"{out[chip]['own_fit_loo_median']:.1%}" if own else "n/a"
        print(f"  {chip}: {len(idx)} recipes; own-fit leave-one-out median {own_txt}, pooled (nested) "
              f"{out[chip]['pooled_nested_median']:.1%}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="recipe names (default: every compiled recipe)")
    ap.add_argument("--write", action="store_true", help="store the fit in src/polychip/estimate/calibration.json")
    ap.add_argument("--collectives", action="store_true", help="also print collective bytes per kind")
    args = ap.parse_args(argv)
    rows = load_recipes(args.only)
    if not rows:
        print("no compiled recipes in the cache; run bench/maxtext/compile_recipes.py first", file=sys.stderr)
        return 2
    pairs = [C.pair_from_ops(r["name"], r["ops"], r["machine"], r["measured"]) for r in rows]
    family, fitted, loo, nested = C.select(pairs) if len(pairs) >= 3 else (None, None, None, None)
    print(f"{len(rows)} recipes; MFU = MaxText 0.2.4 FLOPs / (step x catalog bf16 peak); err = predicted/published - 1")
    print("fitted / LOO: the model family with the lowest leave-one-out error; nested: family chosen and fitted "
          "without the recipe")
    record = print_table(rows, pairs, fitted, loo, nested)
    if fitted is not None:
        print(f"family {family}; fit on all: compute {fitted.compute_efficiency:.2f}, memory "
              f"{fitted.memory_efficiency:.2f}, link {fitted.link_efficiency:.2f}, overlap {fitted.overlap:.1f}; "
              f"band (nested leave-one-out median |error|) {fitted.band:.1%}")
        print("per chip generation (is a separate calibration key justified?):")
        record["per_generation"] = per_generation(rows, pairs, family, nested)
    if args.collectives:
        print_collectives(rows)
    if args.write:
        if fitted is None:
            print("need at least 3 compiled recipes to fit; nothing written", file=sys.stderr)
            return 2
        record.update({
            "fitted": time.strftime("%Y-%m-%d"),
            "method": "grid search, median |MFU error|, over the model families of calibration.FAMILIES; family "
                      "= lowest leave-one-out median; band = nested leave-one-out median",
            "family": family, "grid": {k: [min(v), max(v), len(v)] for k, v in C.FAMILIES[family].items()},
            "compiled_with": rows[0]["meta"]["versions"],
            "sources": {r["name"]: r["r"]["published"]["sources"] for r in rows},
            "loo_fits": {r["name"]: {k: getattr(c, k) for k in C.PARAMS} for r, (c, _) in zip(rows, loo)},
            "machine": "estimate.analytic.machine (catalog chip + host link), as compile and plan",
            "attention": "splash-attention FLOPs inferred from q/k shapes, causal (estimate.kernels)",
            "not_modelled": "sliding-window attention masks (not visible in the HLO: counted as causal)"})
        path = C.store("tpu", fitted, record)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

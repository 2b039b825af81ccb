"""Predicted vs published MFU of Google MaxText's recipes, and the estimator's calibration fitted on them.

Reads the optimised HLO that bench/maxtext/compile_recipes.py cached (<cache>/maxtext/<recipe>/), turns it
into ops with polychip.estimate.hlo.ops_from_hlo, costs it with estimate_step on the catalog chip, and
compares with the recipe's measured step time (bench/maxtext/recipes.yaml, every figure with its source).

MFU convention: MaxText 0.2.4's own training FLOPs per device (calculate_tflops_training_per_device, causal
attention), recorded in each recipe's meta.json, over (step seconds x catalog bf16 peak). Published and
predicted MFU use the same FLOPs and peak, so their relative error is measured step / predicted step - 1;
the "quoted" column is the MFU as the source printed it (older sources count attention non-causally).

Two workarounds for polychip.estimate.hlo, which this bench does not own (both reported to its owner):
instructions spanning lines are folded onto one line before parsing, and convolutions are costed with
only the kernel taps that land on input (see conv_flops_valid_taps). Not modelled by the estimator at all:
host-offload traffic (MaxText's offloaded remat tensors live in host memory, S(5), which the HLO walk
treats as free) and the FLOPs of MaxText's splash-attention kernels (no declared cost: opaque ops).

"hostGB": host-memory arrays carried by the step's loops (offloaded remat tensors), not costed.
"chk" is the source's TFLOP/s x step seconds over MaxText 0.2.4's count in the source's convention: 1.00
means the compiled settings are the measured ones.

Columns: uncalibrated (roofline, all efficiencies 1), fitted (the fit on all recipes, in-sample) and
leave-one-out (each recipe predicted by the fit on the others: the honest error). `--write` stores the fit
with band = leave-one-out median |error| in src/polychip/estimate/calibration.json.

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

import numpy as np
import yaml

from polychip.estimate import calibration as C
from polychip.estimate import hlo as _hlo
from polychip.estimate.hlo import ops_from_hlo
from polychip.estimate.ops import Calibration, estimate_step, machine_for
from polychip.files import cache_dir
from polychip.hardware.catalog import get_chip

RECIPES = Path(__file__).resolve().parent / "maxtext" / "recipes.yaml"
HLO_NAME = "train_step.after_optimizations.txt"  # as bench/maxtext/compile_recipes.py writes it


_HEAD = re.compile(r"^(ENTRY )?%?[\w.\-]+ .*\{\s*$")


def join_continued_lines(text: str) -> str:
    """Fold instructions that span lines back onto one line.

    MaxText's splash-attention custom calls carry a backend_config JSON with literal newlines (its
    xprof_metadata): 777 such lines in the v6e-256 Llama3.1-8B module. polychip.estimate.hlo reads one
    instruction per line and takes any unindented line for the end of a computation, so without this it
    silently loses everything after the first such call (the layer loops included)."""
    out: list[str] = []
    for line in text.splitlines():
        cont = (out and line and not line[0].isspace() and line != "}" and not line.startswith("HloModule")
                and not _HEAD.match(line))
        if cont:
            out[-1] += " " + line
        else:
            out.append(line)
    return "\n".join(out)


def conv_flops_valid_taps(ins, shapes: dict) -> float:
    """Convolution FLOPs counting only the kernel taps that land on input, not on padding.

    XLA:TPU writes some per-head matmuls as a convolution whose window spans a padded size-1 spatial dim
    (`window={size=1x32 pad=0_0x31_31 rhs_reversal=0x1}`): one tap of 32 is real. polychip.estimate.hlo's
    dot_flops multiplies by the whole window, 32x the work (the Q/K/V projections of the v6e-256 Llama3.1-8B
    recipe came out at 35 TFLOP a layer, and the program at 3.4x MaxText's FLOPs). Same formula otherwise:
    2 x output elements x input features x (valid taps per output, per spatial dim)."""
    out = _hlo._dims(ins.type_text)
    lhs = _hlo._dims(shapes.get(ins.operands[0], "")) if ins.operands else []
    rhs = _hlo._dims(shapes.get(ins.operands[1], "")) if len(ins.operands) > 1 else []
    m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
    if not (out and lhs and rhs and m) or "i" not in m.group(2):
        return _dot_flops_upstream(ins, shapes)
    lhs_l, rhs_l, out_l = m.groups()
    win = re.search(r"window=\{([^}]*)\}", ins.attrs)
    spec = dict(kv.split("=", 1) for kv in win.group(1).split()) if win else {}
    n_sp = sum(c.isdigit() for c in out_l)

    def per_dim(key, default):
        vals = spec[key].split("x") if key in spec else [default] * n_sp
        return [tuple(int(x) for x in v.split("_")) if "_" in v else int(v) for v in vals]
    size, stride = per_dim("size", "1"), per_dim("stride", "1")
    pad, ldil, rdil = per_dim("pad", "0_0"), per_dim("lhs_dilate", "1"), per_dim("rhs_dilate", "1")
    taps = 1.0
    for d in range(n_sp):
        n_in, n_out = lhs[lhs_l.index(str(d))], out[out_l.index(str(d))]
        if n_out * size[d] > 4_000_000:  # too large to enumerate: the unpadded count
            taps *= size[d]
            continue
        pos = np.arange(n_out)[:, None] * stride[d] + np.arange(size[d])[None, :] * rdil[d] - pad[d][0]
        ok = (pos >= 0) & (pos <= (n_in - 1) * ldil[d]) & (pos % ldil[d] == 0)
        taps *= ok.sum() / n_out
    return 2.0 * math.prod(out) * rhs[rhs_l.index("i")] * taps


def _dot_flops(ins, shapes: dict) -> float:
    return conv_flops_valid_taps(ins, shapes) if ins.opcode == "convolution" else _dot_flops_upstream(ins, shapes)


# Until polychip.estimate.hlo counts padded convolution windows right (reported to its owner), the bench
# costs convolutions with the valid-tap count above.
_dot_flops_upstream = _hlo.dot_flops
_hlo.dot_flops = _dot_flops


def source_tflop(r: dict, meta: dict) -> float:
    """MaxText's TFLOP per device per step for this recipe in its source's attention convention."""
    fl = meta["maxtext_tflops_per_device"]
    causal = r["published"].get("attention_flops", "causal") == "causal"
    return fl["total"] if causal else fl["weights"] + 2 * fl["attention_causal"]


_HOST_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]\{[^}]*S\(5\)[^}]*\}")
_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "f64": 8, "s64": 8}


def host_loop_bytes(text: str) -> float:
    """Bytes of host-memory (layout S(5)) arrays carried by while loops, summed over loops: the remat
    tensors MaxText offloads. A diagnostic the estimator does not cost (the HLO walk treats S(n) as free)."""
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
        text = join_continued_lines((d / HLO_NAME).read_text())
        ops = ops_from_hlo(text, meta["n_devices"], dps)
        chip = get_chip(r["chip"])
        m = machine_for(chip)
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


def print_table(rows: list[dict], pairs: list, fitted: Calibration | None, loo: list | None) -> dict:
    """The comparison table; returns the per-recipe numbers for the stored record."""
    hdr = (f"{'recipe':24s} {'quoted':>7s} {'chk':>4s} {'step s':>7s} {'MFU':>6s} | {'uncal':>6s} {'err':>7s} | "
           f"{'fitted':>6s} {'err':>7s} | {'LOO':>6s} {'err':>7s} | {'hostGB':>6s} | bound (uncal)")
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
        print(line + f" | {row['host_bytes'] / 1e9:6.0f} | {est.bound} (comp {est.t_flops:.2f} s, hbm {est.t_memory:.2f} s, "
                     f"coll {est.t_collectives:.2f} s)")
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
    fitted, loo = (C.calibrate(pairs) if len(pairs) >= 2 else (None, None))
    print(f"{len(rows)} recipes; MFU = MaxText 0.2.4 FLOPs / (step x catalog bf16 peak); err = predicted/published - 1")
    record = print_table(rows, pairs, fitted, loo)
    if fitted is not None:
        print(f"fit on all: compute {fitted.compute_efficiency:.2f}, memory {fitted.memory_efficiency:.2f}, "
              f"link {fitted.link_efficiency:.2f}, overlap {fitted.overlap:.1f}; "
              f"band (leave-one-out median |error|) {fitted.band:.1%}")
    if args.collectives:
        print_collectives(rows)
    if args.write:
        if fitted is None:
            print("need at least 2 compiled recipes to fit; nothing written", file=sys.stderr)
            return 2
        record.update({
            "fitted": time.strftime("%Y-%m-%d"), "method": "grid search, median |MFU error|; band = LOO median",
            "grid": {k: [min(v), max(v), len(v)] for k, v in C.GRID.items()},
            "compiled_with": rows[0]["meta"]["versions"],
            "sources": {r["name"]: r["r"]["published"]["sources"] for r in rows},
            "loo_fits": {r["name"]: {k: getattr(c, k) for k in C.PARAMS} for r, (c, _) in zip(rows, loo)},
            "bench_workarounds": [
                "HLO instructions spanning lines (splash-attention backend_config) folded onto one line",
                "convolution FLOPs count only kernel taps on input, not on padding (conv_flops_valid_taps)"],
            "not_modelled": "host-offload traffic (S(5) buffers: remat offload) and splash-attention FLOPs "
                            "(opaque kernels) are not in the estimate; the efficiencies absorb them"})
        path = C.store("tpu", fitted, record)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""polychip vs Google MaxText, compile to compile, for mixture-of-experts training steps (issue 13).

For each configuration in bench/maxtext/moe_compare.yaml (same model shape, topology, global batch, sequence,
remat and fsdp x expert degrees on both sides), prints:
  - HBM per device: the HBM total of the TPU compiler's buffer-assignment report (the memory-usage report
    XLA dumps) on both sides, what polychip's `compile` decides fit by; polychip's all-live sum beside it;
  - collective bytes per device per step, by kind, from one HLO walk (polychip.compile.hlo.analyse) over
    both optimised modules;
  - the estimator's step time (the TPU calibration `compile` prints) over both modules.
No measured figure exists for these configurations: every number here is compiled or estimated.

MaxText's side is compiled first, in its own venv:
    /work/maxtext-venv/bin/python bench/maxtext/compile_recipes.py --recipes bench/maxtext/moe_compare.yaml
then (polychip compiles its side here, or reuses `compile`'s cache):
    PYTHONPATH=src JAX_PLATFORMS=cpu .venv/bin/python bench/moe_compare.py [--only NAME ...]
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from polychip.compile.hlo import analyse, ops_of
from polychip.estimate.analytic import machine
from polychip.estimate.calibration import calibration_for
from polychip.estimate.ops import estimate_step
from polychip.files import cache_dir
from polychip.hardware.catalog import get_chip

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "maxtext" / "moe_compare.yaml"
HLO_NAME = "train_step.after_optimizations.txt"  # as bench/maxtext/compile_recipes.py writes it
CHIP = {"v6e": "tpu-v6e", "tpu7x": "tpu7x", "v5p": "tpu-v5p"}


def polychip_side(args: str) -> dict:
    """Run `polychip compile ARGS --json` (its cache answers a repeated configuration) and read the report."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        cmd = [sys.executable, "-c", "import sys; from polychip.cli import main; sys.exit(main())", "compile",
               *shlex.split(args), "--json", str(out)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not out.exists():
            tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
            return {"error": f"polychip compile exit {res.returncode}: {tail}"}
        rep = json.loads(out.read_text())
    figs = rep["steps"][0]["figures"]
    f = {k: v["value"] for k, v in figs.items() if isinstance(v, dict)}
    return {"hbm": f.get("hbm_sum_per_device"), "assigned": f.get("hbm_used_per_device"),
            "step": f.get("step_time"),
            "compile_s": f.get("compile_time"), "total": f.get("collective_bytes_per_device"),
            "kinds": figs.get("collective_bytes_per_device", {}).get("note", ""),
            "tokens": rep["batch"] * rep["seq"]}


def maxtext_side(name: str, r: dict) -> dict:
    d = cache_dir("maxtext") / name
    meta_p = d / "meta.json"
    if not meta_p.exists() or not (d / HLO_NAME).exists():
        return {"error": "not compiled (run bench/maxtext/compile_recipes.py --recipes " + str(CONFIGS) + ")"}
    meta = json.loads(meta_p.read_text())
    if meta.get("status") != "ok":
        return {"error": f"MaxText compile status {meta.get('status')}"}
    stats = analyse((d / HLO_NAME).read_text(), meta["n_devices"])
    chip = get_chip(CHIP[r["chip"]])
    est = estimate_step(ops_of({"ops": stats.ops}), machine(chip), calibration_for(chip.family))
    return {"hbm": None, "assigned": meta.get("hbm_bytes"), "step": est.t_step, "compile_s": meta.get("compile_seconds"),
            "total": stats.collective_total,
            "kinds": ", ".join(f"{k} {_gb(v)}" for k, v in sorted(stats.collective_bytes.items())),
            "tokens": meta["per_device_batch_size"] * meta["n_devices"] * meta["seq"]}


def _gb(x) -> str:
    return "-" if x is None else f"{x / 1e9:.2f} GB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    configs = yaml.safe_load(CONFIGS.read_text())["recipes"]
    unknown = [n for n in args.only or () if n not in configs]
    if unknown:
        print(f"unknown configuration(s): {', '.join(unknown)}; known: {', '.join(configs)}", file=sys.stderr)
        return 2
    for name in args.only or configs:
        r = configs[name]
        chip = get_chip(CHIP[r["chip"]])
        n_chips = r["n_devices"] / chip.devices_per_chip
        print(f"\n{name}: {r['model']} on {r['topology']} (polychip: {' '.join(r['polychip'].split())})")
        sides = {"polychip": polychip_side(" ".join(r["polychip"].split())), "MaxText 0.2.4": maxtext_side(name, r)}
        for who, s in sides.items():
            if "error" in s:
                print(f"  {who:14s} {s['error']}")
                continue
            tps = s["tokens"] / s["step"] / n_chips if s["step"] else None
            print(f"  {who:14s} HBM/device: buffer assignment {_gb(s['assigned'])} (all buffers at once {_gb(s['hbm'])})  "
                  f"collectives/device/step {_gb(s['total'])}  "
                  f"est. step {s['step']:.2f} s ({tps:.0f} tok/s/chip, estimate)  compile {s['compile_s']:.0f} s")
            if s["kinds"]:
                print("  " + " " * 14 + " " + s["kinds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile llama3-8b's real train step for v6e:16x16 and tpu7x:4x4x4 from this CPU host; print fit,
estimated MFU and compile time (figures labelled as in `polychip compile`).

    JAX_PLATFORMS=cpu python bench/compile_llama3.py [--no-cache] [--targets v6e:16x16,tpu7x:4x4x4]
                                                     [--batch 256] [--seq 8192] [overrides ...]

Reference point: MaxText publishes 45.5% measured MFU for Llama3.1-8B on v6e-256 at seq 8192. Our MFU
is an optimistic roofline over the compiled program (see polychip/compile/report.py), an upper bound.
"""
from __future__ import annotations

import argparse
import json
import time

from polychip.compile.display import fmt_value
from polychip.compile.run import Request, compile_report

DEFAULT_OVERRIDES = ["train.compute_dtype=bfloat16", "train.param_dtype=float32", "train.remat=full"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", default="v6e:16x16,tpu7x:4x4x4")
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--json", help="write all reports here")
    ap.add_argument("overrides", nargs="*", default=None)
    a = ap.parse_args()
    ov = a.overrides or DEFAULT_OVERRIDES
    reports = []
    for tgt in a.targets.split(","):
        t0 = time.perf_counter()
        rep = compile_report(Request(model=a.model, target=tgt, batch=a.batch, seq=a.seq, overrides=tuple(ov),
                                     use_cache=not a.no_cache), show_progress=True)
        wall = time.perf_counter() - t0
        f = rep["steps"][0]["figures"]
        print(f"{a.model} on {tgt} ({rep['target']['chips']} chips, mesh {rep['mesh_text']}), batch {a.batch} x {a.seq}, "
              f"{' '.join(ov)}{' (cached)' if rep['cached'] else ''}")
        print(f"  fits: {rep['fits']}  HBM/chip {fmt_value(f['hbm_used_per_chip']['value'], 'B')} of "
              f"{fmt_value(f['hbm_per_device']['value'] * rep['target']['devices_per_chip'], 'B')} "
              f"(temp {fmt_value(f['temp_bytes_per_device']['value'], 'B')}/device)")
        print(f"  est. step {fmt_value(f['step_time']['value'], 's')} [{f['step_time']['note']}]: compute "
              f"{fmt_value(f['t_compute']['value'], 's')}, HBM {fmt_value(f['t_hbm']['value'], 's')}, collectives "
              f"{fmt_value(f['t_collectives']['value'], 's')}")
        print(f"  est. MFU {fmt_value(f['mfu']['value'], '')} (upper bound), est. {f['tokens_per_s_per_chip']['value']:,.0f} "
              f"tok/s/chip; program/model FLOPs {f['program_flops']['value'] / f['model_flops']['value']:.3f}")
        print(f"  compiler: flops/device {fmt_value(f['compiler_flops_per_device']['value'], 'FLOP')} (loops once), "
              f"optimal_seconds {f['compiler_optimal_seconds']['value']:.4g}")
        print(f"  compile time {fmt_value(f['compile_time']['value'], 's')} ({f['compile_time']['note']}); wall {wall:.1f} s")
        for s in rep["steps"]:
            for n in s["notes"]:
                print(f"  note: {n}")
        reports.append(rep)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(reports, fh, indent=1, default=str)


if __name__ == "__main__":
    main()

"""Train-step throughput and MFU per preset on the hardware in use.

    JAX_PLATFORMS=cpu .venv/bin/python bench/train_step.py --presets small
    .venv/bin/python bench/train_step.py --presets 125m 1b --dtype bfloat16      # on a GPU/TPU machine

Warm-up steps excluded (the first compiles), median of the timed steps. MFU against the catalog peak
for the chip; on CPU, also against the float32 matmul rate measured *in this run* (the baseline),
since a shared CPU's speed moves with load. The CPU goal for `small` is >= 40% of that peak.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["small"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=0, help="override train.batch_size")
    ap.add_argument("--seq", type=int, default=0, help="override train.seq_len")
    ap.add_argument("--remat", default="", help="override train.remat")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import jax

    from polychip.config import build_config
    from polychip.train.bench import bench_train

    platform = jax.devices()[0].platform
    baseline = None
    if platform == "cpu":
        from polychip.hardware.detect import measure_cpu_matmul_flops

        runs = [measure_cpu_matmul_flops(args.dtype) for _ in range(3)]
        baseline = statistics.median(runs)
        print(f"baseline: {args.dtype} 2048^3 matmul on this CPU, median of 3 best-of-5 runs: {baseline / 1e12:.3f} TFLOP/s"
              f"  (load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs: a loaded"
              f" machine lowers both figures, not always alike)")
    rows = []
    for name in args.presets:
        ov = [f"train.compute_dtype={args.dtype}", *args.overrides]
        if args.batch:
            ov.append(f"train.batch_size={args.batch}")
        if args.seq:
            ov.append(f"train.seq_len={args.seq}")
        if args.remat:
            ov.append(f"train.remat={args.remat}")
        cfg = build_config(name, overrides=ov)
        t0 = time.perf_counter()
        r = bench_train(cfg, warmup=args.warmup, steps=args.steps)
        r["preset"] = name
        r["wall_s"] = time.perf_counter() - t0
        if baseline:
            r["baseline_tflops"] = baseline / 1e12
            r["fraction_of_measured_peak"] = r["model_tflops_per_s_per_device"] * 1e12 / baseline
        rows.append(r)
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        line = (f"{name:>12}: {r['model_params'] / 1e6:8.1f}M params  batch {r['batch_size']}x{r['seq_len']}  "
                f"{r['devices']} x {r['device_kind']}  median step {r['step_time_median_s'] * 1e3:9.1f} ms  "
                f"{r['tokens_per_s']:>10,.0f} tok/s  {r['model_tflops_per_s_per_device']:.3f} TFLOP/s/dev  MFU {mfu} "
                f"(peak {r['peak_source']})")
        if baseline:
            line += f"  = {100 * r['fraction_of_measured_peak']:.1f}% of this run's matmul baseline"
        print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

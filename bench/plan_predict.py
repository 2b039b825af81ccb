"""The planner's predicted training step time vs. the real polychip train step, on this CPU.

For each case: run the same jitted train step `polychip train` runs (polychip.train.step), time it
(best of a few steps after compilation), and compare with the performance model's prediction:
  - raw estimate (efficiencies 1): the shared estimator (polychip.estimate) over the planner's analytic
    op list, from the measured matmul peak and a measured memory bandwidth;
  - calibrated, leave-one-out: the estimator's calibration fitted on the OTHER cases' measured records
    (plan/calibrate.py), as the planner does with `--records`.
Writes each measurement as a record (source: measured, chip: cpu) under --records-out, the same
format `polychip plan --records` reads. An H100 or TPU run of this script writes records for that
chip instead (the catalog chip for the device; not run here).

    JAX_PLATFORMS=cpu .venv/bin/python bench/plan_predict.py [--records-out runs/records]
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from polychip.config import build_config
from polychip.hardware.detect import cpu_chip, current_chip
from polychip.estimate import Calibration as EstCal
from polychip.estimate import analytic as A
from polychip.estimate import estimate_step
from polychip.plan import calibrate as C
from polychip.plan.records import parse_record, write_record
from polychip.train.step import StepSpec

CASES = [  # (preset, batch, seq)
    ("tiny", 8, 64),
    ("tiny", 32, 128),
    ("small", 8, 128),
    ("small", 16, 256),
    ("small", 4, 512),
]


def measure_bandwidth(n_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Read bytes/s of a jitted reduction over a large fp32 array (no output buffer, so no page
    faults on fresh memory inflate the time)."""
    x = jnp.ones(n_bytes // 4, jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    best = min(_timed(lambda: f(x).block_until_ready()) for _ in range(repeats))
    return n_bytes / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_step(preset: str, batch: int, seq: int, steps: int = 4) -> float:
    cfg = build_config(preset, None, [f"train.batch_size={batch}", f"train.seq_len={seq}", "mesh.fsdp=-1"])
    spec = StepSpec.build(cfg)
    state, fn = spec.init_state(), spec.jitted
    tokens = spec.put_batch(np.random.default_rng(0).integers(0, cfg.model.vocab_size, (batch, seq + 1), dtype=np.int32))
    state, m = fn(state, tokens)  # compile
    jax.block_until_ready(m)
    best = math.inf
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = fn(state, tokens)
        jax.block_until_ready(m)
        best = min(best, time.perf_counter() - t0)
    return best, cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records-out", default="", help="write measured records (JSON) here")
    a = ap.parse_args()
    dev = jax.devices()[0]
    base = cpu_chip("float32") if dev.platform == "cpu" else current_chip(dev)
    bw = measure_bandwidth() if dev.platform == "cpu" else base.hbm_bandwidth
    chip = dataclasses.replace(base, hbm_bandwidth=bw, hbm_bytes=base.hbm_bytes or 16e9,
                               link_bandwidth=base.link_bandwidth or bw)
    n = jax.device_count()
    print(f"device: {base.display} x {n}; peak (measured matmul) {chip.peak('float32') / 1e9:.1f} GFLOP/s, "
          f"memory bandwidth (measured) {bw / 1e9:.1f} GB/s; load average {os.getloadavg()[0]:.1f}")
    rows = []
    for preset, batch, seq in CASES:
        t, cfg = measure_step(preset, batch, seq)
        rec = parse_record({"chip": "cpu" if dev.platform == "cpu" else chip.name, "model": preset, "mode": "train",
                            "chips": n, "batch": batch, "seq": seq, "step_time_s": t, "remat": cfg.train.remat,
                            "dtype": cfg.train.compute_dtype, "source": "measured",
                            "ref": "bench/plan_predict.py (polychip.train.step, best of 4 steps)"})
        rows.append(rec)
        if a.records_out:
            write_record(rec, os.path.join(a.records_out, f"{rec.chip}-{preset}-b{batch}-s{seq}.json"))
    chips = {rows[0].chip: dataclasses.replace(chip, name=rows[0].chip)}
    print(f"{'case':<22}{'measured s':>12}{'raw est s':>12}{'bound':>9}{'loo pred s':>12}{'loo err':>9}")
    errs, raw_errs = [], []
    for i, r in enumerate(rows):
        c = chips[r.chip]
        lay = A.Layout(fsdp=r.chips)
        raw = estimate_step(A.train_ops(r.model, lay, r.batch, r.seq, r.remat, 1), A.machine(c), EstCal())
        pred = C.fit(rows[:i] + rows[i + 1:], chips).for_chip(c)
        p = C.price_record(dataclasses.replace(r, layout=lay, grad_accum=1), c)
        t = C.predict(p, pred)
        err = (t - r.step_time_s) / r.step_time_s
        errs.append(abs(err))
        raw_errs.append(abs(raw.t_step - r.step_time_s) / r.step_time_s)
        print(f"{r.model_name + f' b{r.batch} s{r.seq}':<22}{r.step_time_s:>12.4f}{raw.t_step:>12.4f}{raw.bound:>9}"
              f"{t:>12.4f}{err:>+9.1%}")
    print(f"mean |error|: raw estimate {np.mean(raw_errs):.1%}; calibrated leave-one-out {np.mean(errs):.1%} "
          f"(max {np.max(errs):.1%})")


if __name__ == "__main__":
    main()

"""Train-step benchmark: tokens/s and MFU for a preset on the hardware in use.

Random tokens (no data pipeline in the timing), warm-up steps excluded (the first includes
compilation), median of the timed steps. The chip's peak comes from the catalog; on CPU it is this
machine's matmul peak, measured in the same run (so the MFU ratio is against a baseline measured now).
"""
from __future__ import annotations

import statistics
import time

import jax
import numpy as np

from polychip.config import Config
from polychip.model.flops import mfu, train_flops_per_step
from polychip.train.metrics import peak_flops_per_device
from polychip.train.step import StepSpec


def bench_train(cfg: Config, warmup: int = 2, steps: int = 5, log=print) -> dict:
    spec = StepSpec.build(cfg)
    state = spec.init_state()
    fn = spec.jitted
    t = cfg.train
    rng = np.random.default_rng(0)
    batch = spec.put_batch(rng.integers(0, cfg.model.vocab_size, (t.batch_size, t.seq_len + 1), dtype=np.int32))
    t0 = time.perf_counter()
    state, m = fn(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        state, m = fn(state, batch)
        jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = fn(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    flops = train_flops_per_step(cfg.model, t.batch_size, t.seq_len)
    peak, source = peak_flops_per_device(t.compute_dtype)
    n = jax.device_count()
    res = {
        "model_params": cfg.model.n_params, "batch_size": t.batch_size, "seq_len": t.seq_len,
        "devices": n, "platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind,
        "compute_dtype": t.compute_dtype, "first_step_s": compile_s, "step_time_median_s": med,
        "step_times_s": times, "tokens_per_s": t.batch_size * t.seq_len / med,
        "model_tflops_per_s_per_device": flops / med / n / 1e12,
        "peak_tflops_per_device": None if peak is None else peak / 1e12, "peak_source": source,
        "mfu": mfu(flops, med, n, peak), "loss": float(m["loss"]),
    }
    return res

"""Block-size autotuner for the Pallas flash-attention kernels; winners go to tuned/<device-kind>.json.

TPU (`tune_tpu`, no TPU needed): each candidate is compiled for a deviceless topology with libtpu,
forward + backward in one program. A candidate that Mosaic rejects (VMEM overflow, layout) is dropped, and so is one
whose estimate comes back negative (seen for tpu7x at seq >= 4096 with libtpu 0.0.42.1).
Score = the compiler's `cost_analysis()["optimal_seconds"]` + grid steps x GRID_STEP_S.

What the score does and does not see: for a Mosaic custom call the compiler cannot look inside the
kernel; its optimal_seconds is a roofline (max of flops / peak and bytes / bandwidth) of the
`pl.CostEstimate` each kernel declares. Ours is block-exact (flops of the visited blocks including
the masked waste on diagonal blocks; HBM bytes of the DMAs the index maps issue, K/V re-read per
query block), so larger blocks cost more diagonal flops and fewer K/V bytes. The XLA glue around the
kernels (transposes, padding, delta) is estimated by the compiler itself. A roofline misses the
fixed per-grid-step cost, which favours tiny blocks; we add GRID_STEP_S per step, the figure the
JAX Pallas TPU matmul guide quotes (~0.35 us per grid iteration). The result is a model, not a
measurement; on a real TPU `tune_measured` times candidates instead.

GPU (`tune_measured`): candidates are run and timed on the local device (median of repeats).
"""
from __future__ import annotations

import itertools
import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp

from polychip.kernels.attention import blocks as B_
from polychip.kernels.attention.blocks import BlockSizes

GRID_STEP_S = 0.35e-6
TPU_CANDIDATES = (128, 256, 512, 1024)
GPU_CANDIDATES = (32, 64, 128)


def _loss(fn, **opts):
    return lambda q, k, v: fn(q, k, v, **opts).astype(jnp.float32).sum()


def grid_steps(B, T, S, H, bs: BlockSizes) -> int:
    """Grid iterations of forward + dQ + dK/dV (skipped blocks still cost an iteration)."""
    bq, Tp = B_.fit_block(T, bs.bq, 16)
    bk, Sp = B_.fit_block(S, bs.bk, 16)
    bqd, Tpd = B_.fit_block(Tp, bs.bq_dkv, 16)
    bkd, Spd = B_.fit_block(Sp, bs.bk_dkv, 16)
    return B * H * (2 * (Tp // bq) * (Sp // bk) + (Tpd // bqd) * (Spd // bkd))


def tpu_score(topology: str, *, B, T, H, K, D, dtype="bfloat16", causal=True, window=None,
              bs: BlockSizes) -> float | None:
    """Modelled seconds of forward + backward for one candidate (None if Mosaic rejects it)."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding

    from polychip.kernels.attention import pallas_tpu

    dev = topologies.get_topology_desc(topology, platform="tpu").devices[0]
    s = SingleDeviceSharding(dev)
    q = jax.ShapeDtypeStruct((B, T, H, D), jnp.dtype(dtype), sharding=s)
    kv = jax.ShapeDtypeStruct((B, T, K, D), jnp.dtype(dtype), sharding=s)
    loss = _loss(pallas_tpu.flash_attention, causal=causal, sliding_window=window, block_sizes=bs)
    try:
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
    except Exception:  # Mosaic rejects the candidate (e.g. VMEM): not a usable configuration
        return None
    est = float(compiled.cost_analysis()["optimal_seconds"])
    if est < 0:  # libtpu 0.0.42.1 returns about -2 s for tpu7x programs at seq >= 4096: no estimate
        return None
    return est + grid_steps(B, T, T, H, bs) * GRID_STEP_S


def _fits(c: int, seq: int) -> bool:
    return c <= max(seq, 128)


def tune_tpu(topology: str, *, seq: int, H: int, K: int, D: int, B: int = 1, dtype="bfloat16", causal=True,
             window=None, candidates=TPU_CANDIDATES, dkv_stage: bool = True,
             log: Callable[[str], None] = print) -> tuple[BlockSizes, float]:
    """Two stages: (bq, bk) for forward + dQ with the dK/dV blocks equal; then (if dkv_stage) the dK/dV blocks."""
    cands = [c for c in candidates if _fits(c, seq)]
    kw = dict(B=B, T=seq, H=H, K=K, D=D, dtype=dtype, causal=causal, window=window)
    best, best_s = None, float("inf")

    def consider(bs: BlockSizes) -> None:
        nonlocal best, best_s
        sc = tpu_score(topology, bs=bs, **kw)
        log(f"  {topology} seq={seq} {bs}: {'rejected' if sc is None else f'{sc * 1e3:.3f} ms'}")
        if sc is not None and sc < best_s:
            best, best_s = bs, sc

    for bq, bk in itertools.product(cands, cands):
        consider(BlockSizes(bq, bk, bq, bk))
    if best is None:
        raise RuntimeError(f"no block-size candidate compiled for {topology} seq={seq}")
    for bqd, bkd in itertools.product(cands, cands) if dkv_stage else ():
        if (bqd, bkd) != (best.bq_dkv, best.bk_dkv):
            consider(BlockSizes(best.bq, best.bk, bqd, bkd))
    return best, best_s


def tune_measured(fn, *, seq: int, H: int, K: int, D: int, B: int = 1, dtype="bfloat16", causal=True, window=None,
                  candidates=GPU_CANDIDATES, repeats: int = 10) -> tuple[BlockSizes, float]:
    """Time forward + backward of `fn` (a flash_attention taking block_sizes=) on the local device."""
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (B, seq, H, D), jnp.dtype(dtype))
    k = jax.random.normal(ks[1], (B, seq, K, D), jnp.dtype(dtype))
    v = jax.random.normal(ks[2], (B, seq, K, D), jnp.dtype(dtype))
    best, best_s = None, float("inf")
    for bq, bk in itertools.product(candidates, candidates):
        bs = BlockSizes(bq, bk, bq, bk)
        f = jax.jit(jax.grad(_loss(fn, causal=causal, sliding_window=window, block_sizes=bs), argnums=(0, 1, 2)))
        try:
            jax.block_until_ready(f(q, k, v))
        except Exception:  # does not compile / does not fit on this device
            continue
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(f(q, k, v))
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        if t < best_s:
            best, best_s = bs, t
    if best is None:
        raise RuntimeError("no block-size candidate ran")
    return best, best_s


def save(device_kind: str, results: dict[str, tuple[BlockSizes, float]], method: str):
    entries = {key: {**bs.as_dict(), "score_s": round(s, 9)} for key, (bs, s) in results.items()}
    return B_.write_tuned(device_kind, entries, {"method": method, "jax": jax.__version__})

"""Flash attention: Pallas kernels vs XLA (and cuDNN on NVIDIA), Llama-3-8B attention shapes.

    JAX_PLATFORMS=cpu python bench/kernels_attention.py                # TPU part, deviceless (any host)
    python bench/kernels_attention.py --gpu                            # on an NVIDIA GPU host

Shapes: batch 1, 32 query heads / 8 kv heads, head_dim 128, bf16, causal, seq 2k / 4k / 8k.

TPU part (no TPU needed): each program is compiled for one chip of a deviceless topology (v6e,
tpu7x) and `cost_analysis()["optimal_seconds"]` printed, forward and forward+backward:
- xla: `jax.nn.dot_product_attention` (implementation=None: XLA on TPU); the compiler models XLA's
  own fusions.
- pallas: our kernel. The compiler cannot see inside a Mosaic kernel: its optimal_seconds is the
  roofline of the kernel's declared, block-exact `pl.CostEstimate` (flops of the visited blocks, HBM
  bytes of the DMAs issued) plus the compiler's own estimate of the XLA glue around it. The column
  "+steps" adds 0.35 us per grid step (the Pallas TPU guide's figure), the autotuner's score.
The two columns are therefore models of different fidelity, not measurements.

GPU part (--gpu): median wall time over repeats, reported as TFLOP/s of the causal attention
FLOPs (4*B*H*D*T*(T+1)/2 forward; x3.5 for forward+backward: 2 matmuls forward, 5 backward).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp

from polychip.kernels.attention import autotune
from polychip.kernels.attention.blocks import BlockSizes

B, H, K, D = 1, 32, 8, 128
SEQS = (2048, 4096, 8192)
TOPOLOGIES = ("v6e:2x2", "tpu7x:2x2x1")


def causal_flops(T: int, with_bwd: bool) -> float:
    f = 4.0 * B * H * D * T * (T + 1) / 2
    return f * 3.5 if with_bwd else f


def _programs(fn):
    fwd = lambda q, k, v: fn(q, k, v)  # noqa: E731
    loss = lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum()  # noqa: E731
    return fwd, jax.value_and_grad(loss, argnums=(0, 1, 2))


def tpu_table(topologies=TOPOLOGIES, seqs=SEQS):
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies as topos
    from jax.sharding import SingleDeviceSharding

    from polychip.kernels.attention import pallas_tpu

    print("TPU, compiler-estimated seconds (optimal_seconds), one chip, B=1 H=32 K=8 D=128 bf16 causal")
    print(f"{'target':<12}{'seq':>6} {'pass':<8}{'xla ms':>9}{'pallas ms':>11}{'+steps ms':>11}"
          f"{'xla/pallas':>12}  blocks")
    for topo in topologies:
        dev = topos.get_topology_desc(topo, platform="tpu").devices[0]
        s = SingleDeviceSharding(dev)
        for T in seqs:
            q = jax.ShapeDtypeStruct((B, T, H, D), jnp.bfloat16, sharding=s)
            kv = jax.ShapeDtypeStruct((B, T, K, D), jnp.bfloat16, sharding=s)
            bs = pallas_tpu.pick_blocks(T=T, S=T, H=H, K=K, D=D, dtype="bfloat16", causal=True, window=None,
                                        device_kind=dev.device_kind)
            ours = _programs(lambda q, k, v: pallas_tpu.flash_attention(q, k, v, block_sizes=bs))
            xla = _programs(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
            steps = autotune.grid_steps(B, T, T, H, bs)
            for name, i, nsteps in (("fwd", 0, _fwd_steps(T, bs)), ("fwd+bwd", 1, steps)):
                t_x = jax.jit(xla[i]).lower(q, kv, kv).compile().cost_analysis()["optimal_seconds"]
                t_p = jax.jit(ours[i]).lower(q, kv, kv).compile().cost_analysis()["optimal_seconds"]
                t_ps = t_p + nsteps * autotune.GRID_STEP_S
                # libtpu 0.0.42.1 returns negative optimal_seconds for some programs (tpu7x at seq >=
                # 4096, also for XLA's own attention; v6e fwd+bwd at 8192): print n/a, not a number.
                ms = lambda t, w: f"{t * 1e3:>{w}.3f}" if t >= 0 else f"{'n/a':>{w}}"  # noqa: E731
                ratio = f"{t_x / t_ps:>12.2f}" if t_x >= 0 and t_p >= 0 else f"{'n/a':>12}"
                print(f"{dev.device_kind:<12}{T:>6} {name:<8}{ms(t_x, 9)}{ms(t_p, 11)}{ms(t_ps if t_p >= 0 else -1, 11)}"
                      f"{ratio}  {bs.bq}x{bs.bk}/{bs.bq_dkv}x{bs.bk_dkv}")


def _fwd_steps(T: int, bs: BlockSizes) -> int:
    from polychip.kernels.attention.blocks import fit_block

    bq, Tp = fit_block(T, bs.bq, 16)
    bk, Sp = fit_block(T, bs.bk, 16)
    return B * H * (Tp // bq) * (Sp // bk)


def _time(f, *args, repeats=20) -> float:
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def gpu_table(seqs=SEQS):
    from polychip.kernels.attention import pallas_gpu

    dev = jax.devices()[0]
    print(f"GPU {dev.device_kind}: measured TFLOP/s (median of 20), B=1 H=32 K=8 D=128 bf16 causal")
    print(f"{'seq':>6} {'pass':<8}{'pallas':>9}{'cudnn':>9}{'xla':>9}")
    for T in seqs:
        ks = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(ks[0], (B, T, H, D), jnp.bfloat16)
        k = jax.random.normal(ks[1], (B, T, K, D), jnp.bfloat16)
        v = jax.random.normal(ks[2], (B, T, K, D), jnp.bfloat16)
        impls = {
            "pallas": lambda q, k, v: pallas_gpu.flash_attention(q, k, v),
            "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
            "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"),
        }
        for name, i in (("fwd", 0), ("fwd+bwd", 1)):
            row = []
            for fn in impls.values():
                try:
                    t = _time(jax.jit(_programs(fn)[i]), q, k, v)
                    row.append(f"{causal_flops(T, i == 1) / t / 1e12:>9.1f}")
                except Exception as e:  # e.g. cuDNN missing for this shape: say so, keep going
                    row.append(f"{'n/a':>9}")
                    print(f"  ({type(e).__name__}: {str(e)[:100]})")
            print(f"{T:>6} {name:<8}" + "".join(row))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="measure on the local NVIDIA GPU instead")
    ap.add_argument("--seqs", default=",".join(map(str, SEQS)))
    ap.add_argument("--targets", default=",".join(TOPOLOGIES))
    args = ap.parse_args()
    seqs = tuple(int(s) for s in args.seqs.split(","))
    if args.gpu:
        if jax.devices()[0].platform != "gpu":
            raise SystemExit("--gpu needs an NVIDIA GPU; this host has " + jax.devices()[0].platform)
        gpu_table(seqs)
    else:
        tpu_table(tuple(args.targets.split(",")), seqs)


if __name__ == "__main__":
    main()

"""Flash attention: Pallas kernels vs XLA (and cuDNN on NVIDIA), Llama-3-8B attention shapes.

    JAX_PLATFORMS=cpu python bench/kernels_attention.py                # TPU part, deviceless (any host)
    python bench/kernels_attention.py --gpu --json att.json            # on an NVIDIA GPU host
    JAX_PLATFORMS=cpu python bench/kernels_attention.py --gpu --smoke --seqs 128   # plumbing check, CPU

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

GPU part (--gpu): measured wall time (median over 5 groups of back-to-back calls), reported as TFLOP/s of the causal attention
FLOPs (4*B*H*D*T*(T+1)/2 forward; x3.5 for forward+backward: 2 matmuls forward, 5 backward), for
our Pallas (Triton) kernel, cuDNN (`jax.nn.dot_product_attention(implementation="cudnn")`) and XLA.
Parity: at the shortest sequence, each implementation's output and dq/dk/dv against the float32
reference (max error relative to the reference's largest magnitude; bf16 tolerance 2e-2).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from polychip.kernels.attention import autotune  # noqa: E402
from polychip.kernels.attention.blocks import BlockSizes  # noqa: E402

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


def _time(f, *args, repeats=20, groups=5) -> float:
    """Median over `groups` of the mean time of back-to-back calls (one sync per group, so launch
    latency overlaps the previous call as it does inside a step)."""
    jax.block_until_ready(f(*args))
    n = max(1, repeats // groups)
    ts = []
    for _ in range(groups):
        t0 = time.perf_counter()
        for _ in range(n):
            out = f(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / n)
    return statistics.median(ts)


def _gpu_impls(interpret: bool, skip_cudnn: str | None) -> dict:
    from polychip.kernels.attention import pallas_gpu

    impls = {"pallas": lambda q, k, v: pallas_gpu.flash_attention(q, k, v, interpret=interpret)}
    if not skip_cudnn:
        impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                        implementation="cudnn")
    impls["xla"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    return impls


def _parity(impls: dict, q, k, v) -> dict[str, float | str]:
    """Max relative error (max |x - ref| / max |ref|) over the output and dq, dk, dv of each implementation
    against the float32 reference on the same (upcast) inputs, a fixed random cotangent; an
    implementation that fails gets its error message instead."""
    from polychip.kernels.attention import reference

    ct = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)

    def out_and_grads(fn, *xs):
        o, vjp = jax.vjp(fn, *xs)
        return (o, *vjp(ct.astype(o.dtype)))

    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = jax.jit(lambda *xs: out_and_grads(
        lambda a, b, c: reference.attention(a, b, c, causal=True), *xs))(*f32)
    errs = {}
    for name, fn in impls.items():
        try:
            got = jax.jit(lambda *xs, fn=fn: out_and_grads(fn, *xs))(q, k, v)
            errs[name] = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r)) / (float(jnp.max(jnp.abs(r))) or 1.0))
                             for g, r in zip(got, ref))
        except Exception as e:  # one failing implementation must not hide the others' parity
            errs[name] = f"{type(e).__name__}: {str(e)[:200]}"
    return errs


def gpu_bench(seqs=SEQS, shape=(B, H, K, D), interpret=False, skip_cudnn: str | None = None,
              repeats=20, tol=2e-2, json_path: str | None = None) -> dict:
    """Measured fwd and fwd+bwd time of each implementation per sequence length, with a parity check
    at the shortest length. `interpret`: run the Pallas kernel in the CPU interpreter (smoke runs).
    `json_path` is rewritten after every sequence length, so a run stopped by a time limit keeps its rows."""
    from polychip.files import atomic_write_json

    b, h, kh, d = shape
    dev = jax.devices()[0]
    impls = _gpu_impls(interpret, skip_cudnn)
    res = {"device_kind": dev.device_kind, "platform": dev.platform, "shape": {"B": b, "H": h, "K": kh, "D": d},
           "dtype": "bfloat16", "causal": True, "repeats": repeats, "source": "measured",
           "notes": [f"cuDNN skipped: {skip_cudnn}"] if skip_cudnn else [], "rows": [], "parity": {}}
    if interpret:
        res["notes"].append("Pallas kernel run in interpret mode (CPU): its times are not kernel speed")
    print(f"{dev.device_kind}: measured TFLOP/s ({repeats} calls, median of 5 groups), B={b} H={h} K={kh} D={d} bf16 causal")
    print(f"{'seq':>6} {'pass':<8}" + "".join(f"{n:>9}" for n in impls))
    for T in seqs:
        ks = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(ks[0], (b, T, h, d), jnp.bfloat16)
        k = jax.random.normal(ks[1], (b, T, kh, d), jnp.bfloat16)
        v = jax.random.normal(ks[2], (b, T, kh, d), jnp.bfloat16)
        if T == min(seqs):
            res["parity"] = _parity_checked(impls, q, k, v, tol, res["notes"])
        flops = {i: 4.0 * b * h * d * T * (T + 1) / 2 * (3.5 if i else 1.0) for i in (0, 1)}
        for pname, i in (("fwd", 0), ("fwd+bwd", 1)):
            row = {"seq": T, "pass": pname, "seconds": {}, "tflops": {}, "parity": res["parity"] if T == min(seqs) else {}}
            for name, fn in impls.items():
                try:
                    t = _time(jax.jit(_programs(fn)[i]), q, k, v, repeats=repeats)
                    row["seconds"][name], row["tflops"][name] = t, flops[i] / t / 1e12
                except Exception as e:  # e.g. cuDNN refuses this shape: say so, keep going
                    res["notes"].append(f"{name} seq {T} {pname}: {type(e).__name__}: {str(e)[:200]}")
                    print(f"  ({name}: {type(e).__name__}: {str(e)[:100]})")
            res["rows"].append(row)
            print(f"{T:>6} {pname:<8}" + "".join(f"{row['tflops'][n]:>9.2f}" if n in row["tflops"] else f"{'n/a':>9}"
                                                 for n in impls))
        if json_path:
            atomic_write_json(json_path, res)
    return res


def _parity_checked(impls, q, k, v, tol, notes) -> dict[str, float]:
    errs = {}
    for name, err in _parity(impls, q, k, v).items():
        if isinstance(err, str):
            notes.append(f"{name} parity check failed to run: {err}")
            print(f"  parity seq {q.shape[1]}: {name:<7} failed to run: {err[:100]}")
            continue
        errs[name] = err
        verdict = "ok" if err <= tol else f"MISMATCH (> {tol})"
        print(f"  parity seq {q.shape[1]}: {name:<7} max rel err {err:.2e} vs fp32 reference (out, dq, dk, dv): {verdict}")
        if err > tol:
            notes.append(f"{name} parity {err:.2e} exceeds {tol} at seq {q.shape[1]}")
    return errs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", help="measure on the local NVIDIA GPU instead")
    ap.add_argument("--smoke", action="store_true",
                    help="with --gpu: tiny shapes on CPU, Pallas in interpret mode, no cuDNN (checks the plumbing)")
    ap.add_argument("--json", metavar="FILE", help="with --gpu: write the measured rows and parity as JSON")
    ap.add_argument("--repeats", type=int, default=20, help="with --gpu: timed calls per program (in 5 groups; the median group is reported)")
    ap.add_argument("--seqs", default=",".join(map(str, SEQS)))
    ap.add_argument("--targets", default=",".join(TOPOLOGIES))
    args = ap.parse_args()
    seqs = tuple(int(s) for s in args.seqs.split(","))
    if args.gpu and args.smoke:
        gpu_bench(seqs, shape=(1, 4, 2, 64), interpret=True, repeats=args.repeats, json_path=args.json,
                  skip_cudnn="CPU smoke run (cuDNN needs an NVIDIA GPU)")
    elif args.gpu:
        if jax.devices()[0].platform != "gpu":
            raise SystemExit("--gpu needs an NVIDIA GPU; this host has " + jax.devices()[0].platform)
        gpu_bench(seqs, repeats=args.repeats, json_path=args.json)
    else:
        tpu_table(tuple(args.targets.split(",")), seqs)


if __name__ == "__main__":
    main()

"""Fused ops at Llama-3-8B sizes: our kernels vs the XLA reference, compiled for real TPU targets.

    JAX_PLATFORMS=cpu python bench/kernels_ops.py [--targets v6e:2x2,tpu7x:2x2x1] [--gpu]

TPU (no chip needed: libtpu's deviceless compiler): each op (forward + backward where it has one)
is compiled for one device of the target, and we print
  est_ms   cost_analysis()['optimal_seconds'] -- XLA's roofline estimate of the compiled program.
           CAUTION: XLA cannot see inside a Mosaic (Pallas) kernel; for those it uses the kernel's
           attached pl.CostEstimate (our analytic flops / transcendentals / HBM bytes of the block
           schedule, re-reads included). So Pallas rows are "our estimate through XLA's roofline",
           XLA rows are the compiler's own analysis.
           XLA's estimate of a program with a while loop (lax.scan: xla_chunked) counts the loop
           body once, not once per trip -- compare its TFLOP column with the reference's.
  TFLOP    cost_analysis()['flops'] (same caveats).
  temp_MiB memory_analysis().temp_size_in_bytes (scratch the program allocates in HBM)
  io_MiB   argument + output bytes.
--gpu: on a machine with an NVIDIA GPU, also time each op (median of 10 after warm-up).
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from polychip.kernels.cross_entropy import pallas_tpu as ce_tpu  # noqa: E402
from polychip.kernels.cross_entropy import reference as ce_ref  # noqa: E402
from polychip.kernels.cross_entropy import xla_chunked  # noqa: E402
from polychip.kernels.paged_attention import pallas_gpu as pa_gpu  # noqa: E402
from polychip.kernels.paged_attention import pallas_tpu as pa_tpu  # noqa: E402
from polychip.kernels.paged_attention import reference as pa_ref  # noqa: E402
from polychip.kernels.rms_norm import pallas_gpu as rms_gpu  # noqa: E402
from polychip.kernels.rms_norm import pallas_tpu as rms_tpu  # noqa: E402
from polychip.kernels.rms_norm import reference as rms_ref  # noqa: E402

BF16 = jnp.bfloat16
D_MODEL, VOCAB, TOKENS = 4096, 128256, 8192
PA_BATCH, PA_HEADS, PA_KV, HEAD_DIM = 64, 32, 8, 128


def _train(fn, *argnums):
    """value_and_grad of a scalar-valued op (fwd + bwd in one program)."""
    return jax.value_and_grad(fn, argnums=argnums)


def cases(backend: str):
    """[(op, impl, fn, arg shapes)]; backend 'tpu' or 'gpu' selects which kernels stand beside XLA."""
    rms_k = rms_tpu.rms_norm if backend == "tpu" else rms_gpu.rms_norm
    def rms(f):  # (x, scale, dy) -> (y, dx, dscale): forward + backward, every result materialised
        def run(x, s, dy):
            y, pull = jax.vjp(f, x, s)
            return (y, *pull(dy))
        return run
    rshape = [((TOKENS, D_MODEL), BF16), ((D_MODEL,), BF16), ((TOKENS, D_MODEL), BF16)]
    out = [("rms_norm fwd+bwd [8192,4096]", name, rms(f), rshape)
           for name, f in [(f"pallas_{backend}", rms_k), ("xla_reference", rms_ref.rms_norm)]]
    ce_args = [((TOKENS, D_MODEL), BF16), ((D_MODEL, VOCAB), BF16), ((TOKENS,), jnp.int32), ((TOKENS,), jnp.float32)]
    ce = lambda f: _train(lambda h, w, y, m: f(h, w, y, m)[0], 0, 1)  # noqa: E731
    impls = [("xla_chunked", xla_chunked.cross_entropy), ("xla_reference", ce_ref.cross_entropy)]
    if backend == "tpu":
        impls.insert(0, ("pallas_tpu", ce_tpu.cross_entropy))
    out += [("cross_entropy fwd+bwd N8192 D4096 V128256", n, ce(f), ce_args) for n, f in impls]
    pa_k = pa_tpu.paged_attention if backend == "tpu" else pa_gpu.paged_attention
    for ctx in (2048, 8192):
        for ps in (16, 128):
            M = ctx // ps
            P = PA_BATCH * M
            args = [((PA_BATCH, PA_HEADS, HEAD_DIM), BF16), ((PA_KV, P, ps, HEAD_DIM), BF16),
                    ((PA_KV, P, ps, HEAD_DIM), BF16), ((PA_BATCH, M), jnp.int32), ((PA_BATCH,), jnp.int32)]
            op = f"paged_attention B64 ctx{ctx} page{ps} 32q/8kv"
            out += [(op, f"pallas_{backend}", pa_k, args),
                    (op, "xla_reference", functools.partial(pa_ref.paged_attention, precision=None), args)]
    return out


def compile_for(target: str, only: str = ""):
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding

    dev = topologies.get_topology_desc(target, platform="tpu").devices[0]
    sh = SingleDeviceSharding(dev)
    print(f"\n== {target} ({dev.device_kind}), one device; compiler estimates, nothing executed ==")
    print(f"{'op':44s} {'impl':14s} {'est_ms':>9s} {'TFLOP':>7s} {'temp_MiB':>9s} {'io_MiB':>8s}")
    for op, name, fn, shapes in cases("tpu"):
        if only and only not in op:
            continue
        args = [jax.ShapeDtypeStruct(s, dt, sharding=sh) for s, dt in shapes]
        try:
            c = jax.jit(fn).lower(*args).compile()
        except Exception as e:  # report and go on: one failed compile should not hide the others
            print(f"{op:44s} {name:14s} compile failed: {str(e).splitlines()[0][:80]}")
            continue
        ca, ma = c.cost_analysis() or {}, c.memory_analysis()
        est = ca.get("optimal_seconds")
        io = (ma.argument_size_in_bytes + ma.output_size_in_bytes) / 2**20
        # libtpu 0.0.42 returns negative optimal_seconds for some XLA programs on tpu7x: print n/a.
        est_s = f"{est * 1e3:9.3f}" if est and est > 0 else f"{'n/a':>9s}"
        print(f"{op:44s} {name:14s} {est_s} {ca.get('flops', 0) / 1e12:7.2f} "
              f"{ma.temp_size_in_bytes / 2**20:9.1f} {io:8.1f}")


def time_on_gpu():
    dev = jax.devices("gpu")[0]
    print(f"\n== measured on {dev.device_kind} (median of 10) ==")
    key = jax.random.key(0)
    for op, name, fn, shapes in cases("gpu"):
        args = []
        for i, (s, dt) in enumerate(shapes):
            k = jax.random.fold_in(key, i)
            if dt == jnp.int32:
                hi = VOCAB if "cross" in op else (s[-1] if len(s) == 1 else shapes[1][0][1])
                args.append(jax.random.randint(k, s, 0, hi, dt))
            else:
                args.append(jax.random.normal(k, s, jnp.float32).astype(dt))
        if "paged" in op:  # full-length sequences: lengths = context
            args[4] = jnp.full(shapes[4][0], shapes[3][0][1] * shapes[1][0][2], jnp.int32)
        f = jax.jit(fn)
        jax.block_until_ready(f(*args))
        ts = []
        for _ in range(10):
            t = time.perf_counter()
            jax.block_until_ready(f(*args))
            ts.append(time.perf_counter() - t)
        print(f"{op:44s} {name:14s} {statistics.median(ts) * 1e3:9.3f} ms")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="v6e:2x2,tpu7x:2x2x1")
    ap.add_argument("--only", default="", help="run only ops whose name contains this")
    ap.add_argument("--gpu", action="store_true", help="time on the local GPU (needs one)")
    a = ap.parse_args()
    for t in filter(None, a.targets.split(",")):
        compile_for(t, a.only)
    if a.gpu:
        time_on_gpu()


if __name__ == "__main__":
    main()

"""Pallas flash attention (TPU Mosaic interpreter, GPU/Triton interpreter) vs the fp32 reference.

Forward output and gradients (dq, dk, dv) over a grid of odd sequence lengths, GQA ratios (MHA,
2:1, MQA), dtypes, sliding window, soft-cap, traced query offset + valid lengths; a rerun must be
bit-identical; the registry only runs the interpreters when asked by name.

Tolerance (`attention_tol`): 2 * eps(dtype) + 4 * eps(fp32) * sqrt(n), relative to the reference's
scale. The kernels accumulate in fp32, so the sqrt(n) random-walk growth over the longest reduction
n (keys for o and dq; queries x group size for dk and dv; head_dim) is at fp32 round-off; a bf16
kernel adds a bounded number of bf16 roundings (the probabilities cast for the p@v / p^T@dO matmuls,
the output cast), which do not grow with n. The scale is max |ref| floored at 1 because the inputs
are O(1): a gradient the reference gives as exactly 0 (one key: softmax is constant) may come out
as rounding noise. Measured worst cases are ~0.1 (fp32) and ~0.3 (bf16) of this bound.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polychip.kernels import KernelError, KernelPolicy, Target
from polychip.kernels.attention import api, pallas_gpu, pallas_tpu, reference
from polychip.kernels.attention.blocks import BlockSizes

EPS = {"float32": float(jnp.finfo(jnp.float32).eps), "bfloat16": float(jnp.finfo(jnp.bfloat16).eps)}


def attention_tol(dtype: str, n: int) -> float:
    return 2.0 * EPS[dtype] + 4.0 * EPS["float32"] * float(np.sqrt(max(n, 1)))

SMALL = BlockSizes(64, 64, 64, 64)  # small blocks so 130/200-long sequences span several blocks

#      B, T,   S,   H, K, D,  dtype,      options
CASES = {
    "seq1-mha-f32": (1, 1, 1, 2, 2, 32, "float32", {}),
    "seq17-gqa-bf16": (2, 17, 17, 4, 2, 32, "bfloat16", {}),
    "seq130-mqa-window-f32": (1, 130, 130, 4, 1, 64, "float32", {"sliding_window": 37}),
    "seq130-mha-softcap-bf16": (1, 130, 130, 2, 2, 32, "bfloat16", {"soft_cap": 4.0}),
    "offset-lengths-gqa-f32": (2, 65, 200, 4, 2, 32, "float32", {"q_offset": [100, 135], "kv_lengths": [170, 200]}),
    "noncausal-softcap-mqa-bf16": (1, 33, 47, 2, 1, 32, "bfloat16", {"causal": False, "soft_cap": 2.0}),
}
BACKENDS = {"tpu": pallas_tpu.flash_attention, "gpu": pallas_gpu.flash_attention}


def make_inputs(B, T, S, H, K, D, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    mk = lambda key, shape: jax.random.normal(key, shape, jnp.float32).astype(dtype)  # noqa: E731
    return mk(ks[0], (B, T, H, D)), mk(ks[1], (B, S, K, D)), mk(ks[2], (B, S, K, D)), mk(ks[3], (B, T, H, D))


def split_opts(opts):
    """Static options vs. per-sequence arrays (passed as jit arguments, so they are traced)."""
    static = {k: v for k, v in opts.items() if k not in ("q_offset", "kv_lengths")}
    arrays = {k: jnp.asarray(v, jnp.int32) for k, v in opts.items() if k in ("q_offset", "kv_lengths")}
    return static, arrays


def fwd_and_grads(fn, q, k, v, do, **opts):
    o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **opts), q, k, v)
    return (o, *vjp(do))


def reference_fp32(q, k, v, do, **opts):
    up = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref = functools.partial(reference.attention, precision=jax.lax.Precision.HIGHEST)
    return fwd_and_grads(ref, up(q), up(k), up(v), up(do), **opts)


def check(name, got, want, dtype, n):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got)), f"{name}: non-finite values"
    err = float(np.max(np.abs(got - want))) / max(float(np.max(np.abs(want))), 1.0)
    bound = attention_tol(dtype, n)
    assert err <= bound, f"{name}: max error / scale {err:.3g} > tol {bound:.3g} ({dtype}, n={n})"


@functools.lru_cache(maxsize=None)
def _jitted(backend: str, case: str):
    fn = BACKENDS[backend]
    static, _ = split_opts(CASES[case][7])
    return jax.jit(lambda q, k, v, do, arrays: fwd_and_grads(
        functools.partial(fn, interpret=True, block_sizes=SMALL, **static), q, k, v, do, **arrays))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_forward_and_grads_match_reference(backend, case):
    B, T, S, H, K, D, dtype, opts = CASES[case]
    q, k, v, do = make_inputs(B, T, S, H, K, D, dtype)
    static, arrays = split_opts(opts)
    got = _jitted(backend, case)(q, k, v, do, arrays)
    want = reference_fp32(q, k, v, do, **static, **arrays)
    assert got[0].dtype == q.dtype and got[1].dtype == q.dtype and got[2].dtype == k.dtype
    G = H // K
    for name, g, w, n in zip(("o", "dq", "dk", "dv"), got, want, (S, S, T * G, T * G)):
        check(f"{backend}/{case}/{name}", g, w, dtype, max(n, D))
    if case == "seq130-mha-softcap-bf16":  # rerun: bit-identical
        again = _jitted(backend, case)(q, k, v, do, arrays)
        for g, a in zip(got, again):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(a))


def test_softcap_gradient_is_not_the_uncapped_one():
    """Guards the test itself: the soft-cap case must be sensitive to the tanh in the backward."""
    B, T, S, H, K, D, dtype, opts = CASES["seq130-mha-softcap-bf16"]
    q, k, v, do = make_inputs(B, T, S, H, K, D, "float32")
    capped = reference_fp32(q, k, v, do, soft_cap=opts["soft_cap"])
    plain = reference_fp32(q, k, v, do)
    err = float(jnp.max(jnp.abs(capped[1] - plain[1]))) / float(jnp.max(jnp.abs(capped[1])))
    assert err > 10 * attention_tol("bfloat16", T)


def test_registry_selects_interpreters_only_by_name():
    q, k, v, _ = make_inputs(1, 20, 20, 2, 1, 32, "float32")
    cpu = KernelPolicy.create(Target("cpu"))
    query = dict(q_len=20, kv_len=20, n_heads=2, n_kv_heads=1, head_dim=32, dtype="float32", causal=True,
                 sliding_window=None, soft_cap=3.0, has_q_offset=True, has_kv_lengths=False)
    assert cpu.pick("attention", **query).name not in ("pallas_tpu_interpret", "pallas_gpu_interpret")
    assert KernelPolicy.create(Target("tpu", "TPU v6 lite")).pick("attention", **query).name == "pallas_tpu"
    gpu = KernelPolicy.create(Target("gpu", "NVIDIA H100"))
    assert gpu.pick("attention", **query).name != "pallas_gpu"  # not run on a GPU yet: only when named
    assert gpu.with_overrides(attention="pallas_gpu").pick("attention", **query).name == "pallas_gpu"
    with pytest.raises(KernelError, match="needs platform tpu"):
        cpu.with_overrides(attention="pallas_tpu").pick("attention", **query)
    with pytest.raises(KernelError, match="power of two"):
        KernelPolicy.create(Target("gpu")).with_overrides(attention="pallas_gpu").pick(
            "attention", **{**query, "head_dim": 96})
    for name in ("pallas_tpu_interpret", "pallas_gpu_interpret"):
        pol = cpu.with_overrides(attention=name)
        got = api.attention(q, k, v, policy=pol, soft_cap=3.0, q_offset=2)
        want = reference.attention(q, k, v, soft_cap=3.0, q_offset=2, precision=jax.lax.Precision.HIGHEST)
        check(name, got, want, "float32", 20)

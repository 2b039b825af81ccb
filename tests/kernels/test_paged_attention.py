"""Paged decode attention backends vs the float32 reference: ragged lengths, GQA/MQA, shuffled page
tables, soft-cap, bf16/f32, rerun bit-identity, API checks and a deviceless TPU compile."""
from __future__ import annotations

import functools
import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu's lockfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polychip.kernels.registry import KernelError

from polychip.kernels import KernelPolicy, Target
from polychip.kernels.paged_attention import api, pallas_gpu, pallas_tpu, reference
from tests.kernels.tolerance import assert_close

BACKENDS = {
    "pallas_tpu_interpret": functools.partial(pallas_tpu.paged_attention, interpret=True),
    "pallas_gpu_interpret": functools.partial(pallas_gpu.paged_attention, interpret=True),
}
# (B, H, K, D, page_size, max_pages, lengths): lengths 0, exactly one page, mid-page, and full.
CASES = [
    (4, 8, 2, 128, 16, 4, [37, 0, 64, 16]),     # GQA 4:1
    (3, 4, 4, 64, 8, 5, [1, 40, 23]),           # MHA
    (2, 8, 1, 128, 16, 3, [48, 17]),            # MQA
]


def _inputs(B, H, K, D, ps, M, lengths, dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    P = B * M + 3  # a shared pool with spare pages
    q = jax.random.normal(k[0], (B, H, D)).astype(dtype)
    kp = jax.random.normal(k[1], (K, P, ps, D)).astype(dtype)
    vp = jax.random.normal(k[2], (K, P, ps, D)).astype(dtype)
    # Shuffled physical page ids: sequence b's logical page i lands anywhere in the pool.
    bt = jax.random.permutation(k[3], P)[: B * M].reshape(B, M).astype(jnp.int32)
    return q, kp, vp, bt, jnp.asarray(lengths, jnp.int32)


# GQA in both dtypes, MHA/MQA in one each in CI; the full grid under -m heavy.
GRID = [pytest.param(c, dt, id=f"{name}-{dt.__name__}",
                     marks=() if name == "gqa" or (i + j) % 2 == 0 else pytest.mark.heavy)
        for i, (name, c) in enumerate(zip(["gqa", "mha", "mqa"], CASES))
        for j, dt in enumerate([jnp.float32, jnp.bfloat16])]


@pytest.mark.parametrize("case,dtype", GRID)
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_matches_reference(backend, case, dtype):
    *shape, lengths = case
    q, kp, vp, bt, ln = _inputs(*shape, lengths, dtype)
    soft_cap = 20.0 if case is CASES[0] else None
    got = jax.jit(lambda *a: BACKENDS[backend](*a, soft_cap=soft_cap))(q, kp, vp, bt, ln)
    f32 = lambda a: a.astype(jnp.float32)
    want = reference.paged_attention(f32(q), f32(kp), f32(vp), bt, ln, soft_cap=soft_cap)
    assert got.dtype == dtype
    assert_close(got, want, dtype, shape[3] + max(lengths), what=backend)
    assert np.all(np.asarray(got)[np.asarray(ln) == 0] == 0)


def test_pages_past_length_are_ignored():
    """Garbage (NaN) in pages and slots past each length must not reach the output."""
    q, kp, vp, bt, ln = _inputs(2, 4, 2, 128, 16, 3, [20, 33], jnp.float32)
    used = set()
    for b, L in enumerate([20, 33]):
        used |= {(int(bt[b, i]), s) for i in range(3) for s in range(16) if i * 16 + s < L}
    poison = np.ones(kp.shape[1:3], bool)
    for p, s in used:
        poison[p, s] = False
    kp = jnp.where(poison[None, :, :, None], jnp.nan, kp)
    vp = jnp.where(poison[None, :, :, None], jnp.nan, vp)
    want = reference.paged_attention(q, jnp.nan_to_num(kp), jnp.nan_to_num(vp), bt, ln)
    for fn in BACKENDS.values():
        assert_close(fn(q, kp, vp, bt, ln), want, jnp.float32, 128 + 33)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_rerun_bit_identical(backend):
    q, kp, vp, bt, ln = _inputs(*CASES[0][:6], CASES[0][6], jnp.bfloat16, seed=7)
    run = jax.jit(BACKENDS[backend])
    np.testing.assert_array_equal(np.asarray(run(q, kp, vp, bt, ln)), np.asarray(run(q, kp, vp, bt, ln)))


def test_api_registry_and_errors():
    q, kp, vp, bt, ln = _inputs(*CASES[1][:6], CASES[1][6], jnp.float32)
    cpu = KernelPolicy.create(Target("cpu"))
    want = reference.paged_attention(q, kp, vp, bt, ln)
    np.testing.assert_array_equal(api.paged_attention(q, kp, vp, bt, ln, policy=cpu), want)
    got = api.paged_attention(q, kp, vp, bt, ln, policy=cpu.with_overrides(paged_attention="pallas_tpu_interpret"))
    assert_close(got, want, jnp.float32, 64 + 40)
    q_ = dict(batch=1, n_heads=8, n_kv_heads=2, head_dim=128, page_size=16)
    assert KernelPolicy.create(Target("tpu", "TPU v6 lite")).pick("paged_attention", **q_).name == "pallas_tpu"
    gpu = KernelPolicy.create(Target("gpu", "NVIDIA H100"))
    assert gpu.pick("paged_attention", **q_).name == "reference"  # the GPU kernel is not yet run on a GPU: named only
    named = gpu.with_overrides(paged_attention="pallas_gpu")
    assert named.pick("paged_attention", **q_).name == "pallas_gpu"
    with pytest.raises(KernelError):
        named.pick("paged_attention", **{**q_, "page_size": 12})
    with pytest.raises(ValueError, match="multiple of kv heads"):
        api.paged_attention(q[:, :3], kp, vp, bt, ln, policy=cpu)


def test_tpu_kernel_compiles_for_v5e_deviceless():
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding

    dev = topologies.get_topology_desc("v5e:2x2", platform="tpu").devices[0]
    S = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=SingleDeviceSharding(dev))
    B, H, K, D, ps, M, P = 8, 32, 8, 128, 16, 64, 512
    args = (S((B, H, D), jnp.bfloat16), S((K, P, ps, D), jnp.bfloat16), S((K, P, ps, D), jnp.bfloat16),
            S((B, M), jnp.int32), S((B,), jnp.int32))
    compiled = jax.jit(pallas_tpu.paged_attention).lower(*args).compile()
    assert "tpu_custom_call" in compiled.as_text()

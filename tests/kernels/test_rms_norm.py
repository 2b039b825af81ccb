"""RMSNorm backends vs the float32 reference: forward, gradients, rerun bit-identity, registry."""
from __future__ import annotations

import functools
import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu's lockfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polychip.kernels import KernelError, KernelPolicy, Target
from polychip.kernels.rms_norm import api, pallas_gpu, pallas_tpu, reference
from tests.kernels.tolerance import assert_close

BACKENDS = {
    "pallas_tpu_interpret": functools.partial(pallas_tpu.rms_norm, interpret=True),
    "pallas_gpu_interpret": functools.partial(pallas_gpu.rms_norm, interpret=True),
}
# (shape, block_rows for the TPU kernel): odd row counts leave a partial last block.
SHAPES = [((2, 37, 128), 16), ((5, 96), None), ((3, 7, 256), 8)]


def _inputs(shape, dtype, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = (2.0 * jax.random.normal(k1, shape)).astype(dtype)
    s = (1.0 + 0.3 * jax.random.normal(k2, shape[-1:])).astype(dtype)
    dy = jax.random.normal(k3, shape).astype(dtype)
    return x, s, dy


def _vjp(fn, x, s, dy):
    y, pull = jax.vjp(fn, x, s)
    return (y, *pull(dy))


# Every shape in one dtype in CI (alternating), the full shape x dtype grid under -m heavy.
GRID = [pytest.param(s, b, dt, id=f"{s}-{dt.__name__}", marks=() if (i + j) % 2 == 0 else pytest.mark.heavy)
        for i, (s, b) in enumerate(SHAPES) for j, dt in enumerate([jnp.float32, jnp.bfloat16])]


@pytest.mark.parametrize("shape,block_rows,dtype", GRID)
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_forward_and_grads_match_reference(backend, shape, block_rows, dtype):
    x, s, dy = _inputs(shape, dtype)
    fn = BACKENDS[backend]
    if backend == "pallas_tpu_interpret" and block_rows:
        fn = functools.partial(fn, block_rows=block_rows)
    got = jax.jit(lambda x, s, dy: _vjp(lambda a, b: fn(a, b, eps=1e-5), x, s, dy))(x, s, dy)
    f32 = lambda a: a.astype(jnp.float32)
    with jax.default_matmul_precision("highest"):
        want = _vjp(lambda a, b: reference.rms_norm(a, b, eps=1e-5), f32(x), f32(s), f32(dy))
    D, N = shape[-1], int(np.prod(shape[:-1]))
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == dtype
    assert_close(got[0], want[0], dtype, D, what="y")
    assert_close(got[1], want[1], dtype, D, what="dx")
    assert_close(got[2], want[2], dtype, N, what="dscale")


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_rerun_is_bit_identical_and_forward_matches_reference_rounding(backend):
    x, s, dy = _inputs((3, 21, 128), jnp.bfloat16, seed=3)
    run = jax.jit(lambda x, s, dy: _vjp(lambda a, b: BACKENDS[backend](a, b, eps=1e-6), x, s, dy))
    a, b = run(x, s, dy), run(x, s, dy)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    # Same rounding recipe as the reference: the forward agrees bit-for-bit in bf16 except where the
    # float32 row reduction order flips a rounding (rare).
    same = np.mean(np.asarray(a[0]) == np.asarray(reference.rms_norm(x, s, eps=1e-6)))
    assert same > 0.99


def test_registry_picks_and_overrides():
    cpu = KernelPolicy.create(Target("cpu"))
    assert cpu.pick("rms_norm", shape=(4, 128), dtype="float32").name == "reference"
    assert KernelPolicy.create(Target("tpu", "TPU v6 lite")).pick("rms_norm", shape=(4, 128)).name == "pallas_tpu"
    # Not yet run on a GPU: only used when named.
    gpu = KernelPolicy.create(Target("gpu", "NVIDIA H100"))
    assert gpu.pick("rms_norm", shape=(4, 128)).name == "reference"
    assert gpu.with_overrides(rms_norm="pallas_gpu").pick("rms_norm", shape=(4, 128)).name == "pallas_gpu"
    interp = cpu.with_overrides(rms_norm="pallas_tpu_interpret")
    x, s, _ = _inputs((4, 128), jnp.float32)
    np.testing.assert_allclose(api.rms_norm(x, s, eps=1e-5, policy=interp), reference.rms_norm(x, s), rtol=1e-6)
    with pytest.raises(KernelError, match="needs platform tpu"):
        cpu.with_overrides(rms_norm="pallas_tpu").pick("rms_norm", shape=(4, 128))


def test_tpu_kernel_compiles_for_tpu7x_deviceless():
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding

    dev = topologies.get_topology_desc("tpu7x:2x2x1", platform="tpu").devices[0]
    S = jax.ShapeDtypeStruct
    x = S((2, 1000, 4096), jnp.bfloat16, sharding=SingleDeviceSharding(dev))
    s = S((4096,), jnp.bfloat16, sharding=SingleDeviceSharding(dev))
    fn = jax.value_and_grad(lambda x, s: pallas_tpu.rms_norm(x, s).astype(jnp.float32).sum(), argnums=(0, 1))
    text = jax.jit(fn).lower(x, s).compile().as_text()
    assert text.count("tpu_custom_call") >= 2, "expected the forward and backward Mosaic kernels"

"""int8_matmul: the AVX-512 FFI kernel (cpu_ffi) vs the plain-jnp reference computed in float32 at highest
precision, over row counts that use each code path (4-row blocks and the 1-row tail), K with a masked
tail, N not a multiple of the weight-row block; a bit-identical rerun; and the registry's choice."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polychip.kernels import KernelPolicy, Target
from polychip.kernels.int8_matmul import api, cpu_ffi, reference
from polychip.kernels.registry import resolve
from tests.kernels.tolerance import assert_close

REASON = cpu_ffi.ensure_registered()
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"cpu_ffi not usable here: {REASON}")


def _inputs(M, K, N, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k1, (M, K), jnp.float32)
    q = jax.random.randint(k2, (N, K), -127, 128, jnp.int32).astype(jnp.int8)
    scale = jax.random.uniform(k3, (N,), jnp.float32, 0.001, 0.02)
    return x, q, scale


@needs_kernel
@pytest.mark.parametrize("M, K, N", [(1, 576, 1536), (1, 40, 13), (3, 100, 77), (5, 576, 576), (16, 1536, 29)])
def test_matches_reference_and_reruns_bit_identically(M, K, N):
    x, q, scale = _inputs(M, K, N)
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(reference.int8_matmul)(x, q, scale)
    f = jax.jit(cpu_ffi.int8_matmul)
    got = f(x, q, scale)
    assert got.shape == (M, N) and got.dtype == jnp.float32
    assert_close(got, ref, jnp.float32, K)
    np.testing.assert_array_equal(np.asarray(f(x, q, scale)), np.asarray(got))
    # A wrong scale or a dropped K tail is far outside the tolerance (control).
    assert np.max(np.abs(np.asarray(reference.int8_matmul(x, q, scale * 1.01) - ref))) > 1e-3 * np.max(np.abs(ref))


@needs_kernel
def test_registry_uses_the_kernel_for_decode_rows_only():
    cpu = Target("cpu")
    assert resolve("int8_matmul", cpu, dict(m=1, k=576, n=1536, dtype="float32"), None).name == "cpu_ffi"
    assert resolve("int8_matmul", cpu, dict(m=64, k=576, n=1536, dtype="float32"), None).name == "reference"
    assert resolve("int8_matmul", Target("tpu"), dict(m=1, k=576, n=1536, dtype="float32"), None).name == "reference"
    x, q, scale = _inputs(2, 64, 48)
    out = jax.jit(lambda *a: api.int8_matmul(*a, policy=KernelPolicy.create(cpu)))(x, q, scale)
    assert "polychip_int8_matmul" in jax.jit(lambda *a: api.int8_matmul(*a, policy=KernelPolicy.create(cpu))
                                             ).lower(x, q, scale).as_text()
    assert_close(out, reference.int8_matmul(x, q, scale), jnp.float32, 64)

"""quant_matmul: the AVX-512 FFI kernels (cpu_ffi; int8 + scales, bfloat16 bits, output-major float32) vs the
plain-jnp reference computed in float32 at highest precision, over row counts that use each code path (4-row
blocks and the 1-row tail), K with a masked tail, N not a multiple of the weight-row block; a bit-identical
rerun; weights large enough to be split over threads give the one-thread result bit for bit; and the
registry's choice."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polychip.config import ConfigError
from polychip.kernels import KernelPolicy, Target
from polychip.kernels.quant_matmul import api, cpu_ffi, reference
from polychip.kernels.registry import resolve
from polychip.model.quant import bf16_bits
from tests.kernels.tolerance import assert_close

REASON = cpu_ffi.ensure_registered()
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"cpu_ffi not usable here: {REASON}")


def _inputs(M, K, N, mode, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k1, (M, K), jnp.float32)
    if mode == "bf16":
        return x, bf16_bits(jax.random.normal(k2, (N, K)) * 0.05), None
    if mode == "f32":
        return x, jax.random.normal(k2, (N, K), jnp.float32) * 0.05, None
    q = jax.random.randint(k2, (N, K), -127, 128, jnp.int32).astype(jnp.int8)
    return x, q, jax.random.uniform(k3, (N,), jnp.float32, 0.001, 0.02)


@needs_kernel
@pytest.mark.parametrize("mode", ["int8", "bf16", "f32"])
@pytest.mark.parametrize("M, K, N", [(1, 576, 1536), (1, 40, 13), (3, 100, 77), (5, 576, 576), (16, 1536, 29)])
def test_matches_reference_and_reruns_bit_identically(M, K, N, mode):
    x, q, scale = _inputs(M, K, N, mode)
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(reference.quant_matmul)(x, q, scale)
    f = jax.jit(cpu_ffi.quant_matmul)
    got = f(x, q, scale)
    assert got.shape == (M, N) and got.dtype == jnp.float32
    assert_close(got, ref, jnp.float32, K)
    np.testing.assert_array_equal(np.asarray(f(x, q, scale)), np.asarray(got))
    # Control: a 1% change of the activations moves the result far outside the tolerance.
    off = reference.quant_matmul(x * 1.01, q, scale)
    assert np.max(np.abs(np.asarray(off - ref))) > 1e-3 * np.max(np.abs(np.asarray(ref)))


@needs_kernel
@pytest.mark.parametrize("mode", ["int8", "f32"])
def test_threads_split_the_output_columns_without_changing_a_bit(mode, monkeypatch):
    # 4 MB (f32) / 1 MB (int8) of weights: above the kernel's 256 KB per thread, so every CPU takes chunks;
    # 5 rows (one 4-row block and a 1-row tail) and N = 1000 (chunks that end off the 8-column block).
    x, q, scale = _inputs(5, 1024, 1000, mode, seed=3)
    many = np.asarray(jax.jit(cpu_ffi.quant_matmul)(x, q, scale))
    monkeypatch.setenv(cpu_ffi.THREADS_ENV, "1")
    assert cpu_ffi.max_threads() == 1
    one = np.asarray(jax.jit(cpu_ffi.quant_matmul)(x, q, scale))  # a new trace: the attribute is 1
    np.testing.assert_array_equal(many, one)
    with jax.default_matmul_precision("highest"):
        assert_close(many, reference.quant_matmul(x, q, scale), jnp.float32, 1024)


def test_thread_cap_must_be_a_positive_integer(monkeypatch):
    monkeypatch.setenv(cpu_ffi.THREADS_ENV, "two")
    with pytest.raises(ConfigError, match="POLYCHIP_CPU_KERNEL_THREADS='two'"):
        cpu_ffi.max_threads()
    monkeypatch.setenv(cpu_ffi.THREADS_ENV, "")
    assert cpu_ffi.max_threads() == 0


@needs_kernel
def test_registry_uses_the_kernel_for_decode_rows_only():
    cpu = Target("cpu")
    q = dict(k=576, n=1536, dtype="float32", weights="int8")
    assert resolve("quant_matmul", cpu, dict(q, m=1), None).name == "cpu_ffi"
    assert resolve("quant_matmul", cpu, dict(q, m=1, weights="uint16"), None).name == "cpu_ffi"
    assert resolve("quant_matmul", cpu, dict(q, m=64), None).name == "reference"
    assert resolve("quant_matmul", cpu, dict(q, m=16), None).name == "cpu_ffi"
    assert resolve("quant_matmul", cpu, dict(q, m=8, weights="float32"), None).name == "cpu_ffi"
    assert resolve("quant_matmul", cpu, dict(q, m=16, weights="float32"), None).name == "reference"
    assert resolve("quant_matmul", cpu, dict(q, m=1, dtype="bfloat16"), None).name == "reference"
    assert resolve("quant_matmul", Target("tpu"), dict(q, m=1), None).name == "reference"
    x, w, scale = _inputs(2, 64, 48, "int8")
    run = jax.jit(lambda *a: api.quant_matmul(*a, policy=KernelPolicy.create(cpu)))
    assert "polychip_int8_matmul" in run.lower(x, w, scale).as_text()
    assert_close(run(x, w, scale), reference.quant_matmul(x, w, scale), jnp.float32, 64)

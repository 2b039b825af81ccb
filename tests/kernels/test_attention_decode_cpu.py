"""attention's cpu_ffi backend (one-token decode, AVX-512 C++ through XLA's FFI) vs the reference at highest
precision: GQA, MHA and MQA, a head size that is not a multiple of 16, per-row query offsets, key lengths,
a sliding window, large scores (the kernel's exp), a row that sees no key; and the registry's choice."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polychip.kernels import KernelPolicy, Target
from polychip.kernels.attention import api, cpu_ffi, reference
from polychip.kernels.registry import resolve
from tests.kernels.tolerance import assert_close

REASON = cpu_ffi.ensure_registered()
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"cpu_ffi not usable here: {REASON}")


def _qkv(B, H, K, S, D, seed=0, q_scale=1.0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k1, (B, 1, H, D), jnp.float32) * q_scale,
            jax.random.normal(k2, (B, S, K, D), jnp.float32), jax.random.normal(k3, (B, S, K, D), jnp.float32))


@needs_kernel
@pytest.mark.parametrize("B, H, K, S, D, offsets, lengths, window, q_scale", [
    (2, 9, 3, 40, 64, [5, 39], None, None, 1.0),      # GQA, SmolLM2's head shape
    (2, 4, 4, 33, 72, [0, 32], [20, 33], None, 1.0),  # MHA, D with a masked tail, key lengths under the offset
    (1, 8, 1, 64, 32, [50], None, 8, 1.0),            # MQA with a sliding window
    (3, 6, 2, 50, 64, [49, 10, 30], None, 16, 6.0),   # large scores: the exp's range reduction
])
def test_matches_reference(B, H, K, S, D, offsets, lengths, window, q_scale):
    q, k, v = _qkv(B, H, K, S, D, q_scale=q_scale)
    off = jnp.asarray(offsets, jnp.int32)
    kl = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    with jax.default_matmul_precision("highest"):
        ref = reference.attention(q, k, v, causal=True, sliding_window=window, q_offset=off, kv_lengths=kl)
    got = jax.jit(lambda *a: cpu_ffi.decode_attention(*a, sliding_window=window, q_offset=off, kv_lengths=kl))(q, k, v)
    assert got.shape == ref.shape and got.dtype == jnp.float32
    assert_close(got, ref, jnp.float32, S * D)
    # Control: a key one past the query's position changes nothing; the key at it changes the output.
    p = offsets[0]
    if p + 1 < S and (lengths is None or p + 1 < lengths[0]):
        k2 = k.at[0, p + 1].set(100.0)
        np.testing.assert_array_equal(np.asarray(cpu_ffi.decode_attention(q, k2, v, sliding_window=window, q_offset=off,
                                                                         kv_lengths=kl)), np.asarray(got))
    # A key at the query's own position aligned with head 0's query takes all of head 0's weight.
    k3 = k.at[0, p, 0].set(q[0, 0, 0] * 50.0 / float(jnp.linalg.norm(q[0, 0, 0])) * D ** 0.5)
    own = cpu_ffi.decode_attention(q, k3, v, sliding_window=window, q_offset=off, kv_lengths=kl)
    np.testing.assert_allclose(np.asarray(own[0, 0, 0]), np.asarray(v[0, p, 0]), atol=1e-4)


@needs_kernel
def test_a_row_that_sees_no_key_is_zero_like_the_reference():
    q, k, v = _qkv(2, 4, 2, 16, 64)
    off, kl = jnp.asarray([3, 3], jnp.int32), jnp.asarray([0, 16], jnp.int32)
    got = cpu_ffi.decode_attention(q, k, v, q_offset=off, kv_lengths=kl)
    ref = reference.attention(q, k, v, causal=True, q_offset=off, kv_lengths=kl)
    assert not np.asarray(got[0]).any() and not np.asarray(ref[0]).any()
    assert_close(got, ref, jnp.float32, 16 * 64)


@needs_kernel
def test_registry_picks_it_for_cpu_decoding_only():
    cpu = Target("cpu")
    q = dict(q_len=1, kv_len=256, n_heads=9, n_kv_heads=3, head_dim=64, dtype="float32", causal=True,
             sliding_window=None, soft_cap=None, has_q_offset=True, has_kv_lengths=False)
    assert resolve("attention", cpu, q, None).name == "cpu_ffi"
    assert resolve("attention", cpu, dict(q, q_len=8), None).name != "cpu_ffi"  # prefill
    assert resolve("attention", cpu, dict(q, dtype="bfloat16"), None).name != "cpu_ffi"
    assert resolve("attention", cpu, dict(q, soft_cap=50.0), None).name != "cpu_ffi"
    assert resolve("attention", Target("tpu"), q, None).name != "cpu_ffi"
    qq, k, v = _qkv(1, 9, 3, 32, 64)
    run = jax.jit(lambda *a: api.attention(*a, q_offset=jnp.int32(7), policy=KernelPolicy.create(cpu)))
    assert "polychip_decode_attention" in run.lower(qq, k, v).as_text()
    assert_close(run(qq, k, v), reference.attention(qq, k, v, q_offset=jnp.int32(7)), jnp.float32, 32 * 64)

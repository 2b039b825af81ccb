"""The XLA attention (heads-first GEMMs, custom VJP that recomputes probabilities, causal query
blocks) against the reference: forward and gradients for every option, including rows with no
allowed key and ragged query blocks."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polychip.kernels.attention import reference, xla
from tests.kernels.tolerance import assert_close

CASES = {
    "mha": dict(H=4, K=4),
    "gqa_window": dict(H=4, K=2, sliding_window=5),
    "mqa_softcap": dict(H=4, K=1, soft_cap=3.0),
    "gqa_offset": dict(H=4, K=2, T=6, q_offset=7),
    "gqa_offset_per_row": dict(H=4, K=2, T=5, q_offset=np.array([0, 9], np.int32)),
    "kv_lengths_with_empty_row": dict(H=2, K=1, kv_lengths=np.array([0, 11], np.int32), causal=False),
    "not_causal": dict(H=4, K=2, causal=False),
    "gqa_query_blocks": dict(H=4, K=2, query_block=4),  # 13 rows: blocks of 4, 4, 4, 1
    "gqa_window_query_blocks": dict(H=4, K=2, sliding_window=3, query_block=5),
}


def _inputs(H, K, T=13, S=13, D=16, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(0), 4)
    q = 2 * jax.random.normal(ks[0], (2, T, H, D), dtype)
    k = 2 * jax.random.normal(ks[1], (2, S, K, D), dtype)
    v = jax.random.normal(ks[2], (2, S, K, D), dtype)
    do = jax.random.normal(ks[3], (2, T, H, D), dtype)
    return q, k, v, do


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients_match_reference(case, dtype):
    c = dict(CASES[case])
    H, K, T = c.pop("H"), c.pop("K"), c.pop("T", 13)
    q, k, v, do = _inputs(H, K, T=T, S=13 if "q_offset" not in c else 16, dtype=dtype)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    qb = {"query_block": c.pop("query_block")} if "query_block" in c else {}
    want, ref_vjp = jax.vjp(lambda q, k, v: reference.attention(q, k, v, **c), *f32[:3])
    want_grads = ref_vjp(f32[3])
    got, vjp = jax.vjp(lambda q, k, v: xla.attention(q, k, v, **c, **qb), q, k, v)
    grads = vjp(do)
    assert got.dtype == dtype and all(g.dtype == dtype for g in grads)
    S = k.shape[1]
    assert_close(got.astype(jnp.float32), want, dtype, S, what="out")
    for name, g, w in zip("qkv", grads, want_grads):
        assert_close(g.astype(jnp.float32), w, dtype, S * q.shape[-1], c=8.0, what=f"d{name}")
    if "kv_lengths" in c:  # batch row 0 sees no key at all: zeros out, zero gradients, no NaN
        assert not np.any(np.isnan(np.asarray(got, np.float32)))
        np.testing.assert_array_equal(np.asarray(got[0], np.float32), 0.0)
        np.testing.assert_array_equal(np.asarray(grads[0][0], np.float32), 0.0)


def test_rerun_is_bit_identical():
    q, k, v, do = _inputs(4, 2)
    f = jax.jit(lambda q, k, v: jax.vjp(lambda *a: xla.attention(*a, sliding_window=4), q, k, v)[1](do))
    a, b = f(q, k, v), f(q, k, v)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

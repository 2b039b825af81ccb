"""Fused projection + cross-entropy backends vs the float32 reference: value, dh, dw, reruns, registry."""
from __future__ import annotations

import functools
import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu's lockfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polychip.kernels import KernelPolicy, Target
from polychip.kernels.cross_entropy import pallas_tpu, reference, xla_chunked
from tests.kernels.tolerance import assert_close

HI = jax.lax.Precision.HIGHEST
# (N, D, V, xla chunks (tc, vc), tpu blocks): token counts and vocabularies that are not multiples of
# the chunk/block sizes, and one case where everything fits in a single block.
CASES = [
    (37, 128, 300, (16, 128), pallas_tpu.Blocks(tb=16, vb=128, tbw=32, vbw=256)),
    (50, 64, 1000, (64, 384), pallas_tpu.Blocks(tb=32, vb=384, tbw=16, vbw=128)),
    (24, 128, 256, (24, 256), None),
]


def _impl(backend, chunks, blocks, dtype):
    if backend == "xla_chunked":
        prec = HI if dtype == jnp.float32 else None
        return functools.partial(xla_chunked.cross_entropy, token_chunk=chunks[0], vocab_chunk=chunks[1], precision=prec)
    return functools.partial(pallas_tpu.cross_entropy, interpret=True, blocks=blocks)


def _inputs(N, D, V, dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(k[0], (N, D)).astype(dtype)
    w = (jax.random.normal(k[1], (D, V)) * (2.0 / D ** 0.5)).astype(dtype)
    y = jax.random.randint(k[2], (N,), 0, V)
    m = (jax.random.uniform(k[3], (N,)) > 0.25).astype(jnp.float32)
    return h, w, y, m


def _value_and_grads(fn, h, w, y, m):
    return jax.value_and_grad(lambda h, w: fn(h, w, y, m)[0], argnums=(0, 1))(h, w)


# Every case in one dtype in CI (alternating), the full case x dtype grid under -m heavy.
GRID = [pytest.param(c, dt, id=f"N{c[0]}-D{c[1]}-V{c[2]}-{dt.__name__}",
                     marks=() if (i + j) % 2 == 0 else pytest.mark.heavy)
        for i, c in enumerate(CASES) for j, dt in enumerate([jnp.float32, jnp.bfloat16])]


@pytest.mark.parametrize("case,dtype", GRID)
@pytest.mark.parametrize("backend", ["xla_chunked", "pallas_tpu_interpret"])
def test_matches_reference(backend, case, dtype):
    N, D, V, chunks, blocks = case
    h, w, y, m = _inputs(N, D, V, dtype)
    fn = _impl(backend, chunks, blocks, dtype)
    loss, (dh, dw) = jax.jit(lambda h, w: _value_and_grads(fn, h, w, y, m))(h, w)
    count = jax.jit(fn)(h, w, y, m)[1]
    f32 = lambda a: a.astype(jnp.float32)
    with jax.default_matmul_precision("highest"):
        ref = functools.partial(reference.cross_entropy, precision=HI)
        rloss, (rdh, rdw) = _value_and_grads(ref, f32(h), f32(w), y, m)
    assert float(count) == float(m.sum())
    assert dh.dtype == dtype and dw.dtype == dtype
    # loss: a sum over N tokens of D-term dots and V-term log-sum-exps; rounding enters via the logits.
    assert_close(loss, rloss, dtype, D + V + N, what="loss")
    assert_close(dh, rdh, dtype, V, what="dh")
    assert_close(dw, rdw, dtype, N, what="dw")


@pytest.mark.parametrize("backend", ["xla_chunked", "pallas_tpu_interpret"])
def test_rerun_bit_identical(backend):
    N, D, V, chunks, blocks = CASES[0]
    h, w, y, m = _inputs(N, D, V, jnp.bfloat16, seed=5)
    run = jax.jit(lambda h, w: _value_and_grads(_impl(backend, chunks, blocks, jnp.bfloat16), h, w, y, m))
    a, b = jax.tree.leaves(run(h, w)), jax.tree.leaves(run(h, w))
    for u, v in zip(a, b):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_masked_tokens_contribute_nothing():
    h, w, y, m = _inputs(37, 64, 300, jnp.float32, seed=2)
    fn = functools.partial(xla_chunked.cross_entropy, token_chunk=16, vocab_chunk=128)
    _, (dh, _) = jax.value_and_grad(lambda h, w: fn(h, w, y, m)[0], argnums=(0, 1))(h, w)
    assert np.all(np.asarray(dh)[np.asarray(m) == 0] == 0)
    assert np.any(np.asarray(dh)[np.asarray(m) == 1] != 0)


def test_registry_order():
    q = dict(n_tokens=8, d_model=64, vocab=100, dtype="float32")
    assert KernelPolicy.create(Target("cpu")).pick("cross_entropy", **q).name == "xla_chunked"
    assert KernelPolicy.create(Target("gpu", "NVIDIA H100")).pick("cross_entropy", **q).name == "xla_chunked"
    assert KernelPolicy.create(Target("tpu", "TPU v6 lite")).pick("cross_entropy", **q).name == "pallas_tpu"


def test_tpu_kernels_compile_for_v6e_deviceless():
    """Forward + dh + dw Mosaic kernels lower and compile for a real TPU target (libtpu, no chip)."""
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding

    dev = topologies.get_topology_desc("v6e:2x2", platform="tpu").devices[0]
    S = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=SingleDeviceSharding(dev))
    N, D, V = 1000, 512, 3000  # ragged in tokens and vocab for the default blocks
    fn = lambda h, w, y, m: pallas_tpu.cross_entropy(h, w, y, m)[0]
    step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
    compiled = step.lower(S((N, D), jnp.bfloat16), S((D, V), jnp.bfloat16), S((N,), jnp.int32),
                          S((N,), jnp.float32)).compile()
    text = compiled.as_text()
    assert text.count("tpu_custom_call") >= 3, "expected the fwd, dh and dw Mosaic kernels"


def test_vocab_split_rule_by_hand():
    from polychip.kernels.cross_entropy.api import vocab_split_prefers_reference as prefers

    # llama3-405b on 2 v6e slices, tensor 4, tokens over fsdp 8 x context 8: 131,072 / 64 tokens x 32,064
    # vocab columns x 4 B = 263 MB of logits against 16,384 x 128,256 x 2 B = 4.2 GB of projection.
    assert prefers(131_072, 16_384, 128_256, 2, vocab_ways=4, token_ways=64)
    assert not prefers(131_072, 16_384, 128_256, 2, vocab_ways=1, token_ways=64)  # no split: fused
    # 4,096 tokens on one device against a small projection (256 x 4,096 x 4 B = 4 MB): logits 16.8 MB
    assert not prefers(4096, 256, 4096, 4, vocab_ways=2, token_ways=1)


@pytest.mark.parametrize("tokens, fused", [(64, False), (8192, True)])
def test_auto_keeps_a_split_vocab_split_when_the_logits_are_small(tokens, fused):
    """On a tensor-4 mesh of the 8 CPU devices, "auto" runs the per-shard chunked kernel (a shard_map, the
    whole projection on every device) only when its logits per device outgrow the projection; else the
    XLA-partitioned reference, and both give the reference's loss."""
    from polychip.kernels.cross_entropy.api import cross_entropy
    from polychip.parallel.mesh import make_mesh
    from polychip.parallel.sharding import Layout
    from polychip.config import MeshConfig

    layout = Layout.create(make_mesh(MeshConfig(data=1, fsdp=2, tensor=4, num_devices=8), jax.devices()[:8]))
    policy = KernelPolicy.create(Target("cpu")).with_layout(layout)
    assert policy.ways("vocab") == 4 and policy.ways("batch", "seq") == 2
    D, V = 32, 512
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    h = jax.random.normal(k[0], (tokens, D), jnp.float32)
    w = jax.random.normal(k[1], (D, V), jnp.float32) / 8
    y = jax.random.randint(k[2], (tokens,), 0, V)
    m = jnp.ones((tokens,), jnp.float32)
    fn = jax.jit(functools.partial(cross_entropy, policy=policy))
    text = str(jax.make_jaxpr(fn)(h, w, y, m))
    assert ("shard_map" in text) == fused
    got, _ = fn(h, w, y, m)
    want, _ = reference.cross_entropy(h, w, y, m)
    np.testing.assert_allclose(got, want, rtol=1e-5)

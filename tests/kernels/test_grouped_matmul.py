"""grouped_matmul backends vs the float32 reference: forward and both gradients (including empty
groups, groups sharing an m-tile, rows past the last group), rerun bit-identity, the registry, and a
deviceless TPU compile of the Pallas kernels next to XLA's ragged dot."""
from __future__ import annotations

import functools
import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu's lockfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polychip.kernels import KernelPolicy, Target
from polychip.kernels.grouped_matmul import api, pallas_gpu, pallas_tpu, reference, xla, xla_tiled
from tests.kernels.tolerance import assert_close

BACKENDS = {
    "xla": xla.grouped_matmul,
    "xla_tiled": xla_tiled.grouped_matmul,
    "pallas_tpu_interpret": functools.partial(pallas_tpu.grouped_matmul, interpret=True),
    "pallas_gpu_interpret": functools.partial(pallas_gpu.grouped_matmul, interpret=True),
}
# (M, K, N, group sizes): an empty group, groups that start mid-tile, 3 rows past the last group.
CASES = [(70, 256, 128, (10, 0, 33, 7, 17)), (40, 128, 256, (0, 40, 0)), (150, 128, 128, (64, 1, 60, 22))]
GRID = [pytest.param(c, dt, id=f"{c[0]}x{c[1]}x{c[2]}-{dt.__name__}", marks=() if (i + j) % 2 == 0 else pytest.mark.heavy)
        for i, c in enumerate(CASES) for j, dt in enumerate([jnp.float32, jnp.bfloat16])]


def _inputs(M, K, N, sizes, dtype, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    lhs = jax.random.normal(k1, (M, K)).astype(dtype)
    rhs = (jax.random.normal(k2, (len(sizes), K, N)) / np.sqrt(K)).astype(dtype)
    dy = jax.random.normal(k3, (M, N)).astype(dtype)
    return lhs, rhs, jnp.asarray(sizes, jnp.int32), dy


def _vjp(fn, lhs, rhs, gs, dy):
    y, pull = jax.vjp(lambda a, b: fn(a, b, gs), lhs, rhs)
    return (y, *pull(dy))


@pytest.mark.parametrize("case,dtype", GRID)
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_forward_and_grads_match_reference(backend, case, dtype):
    M, K, N, sizes = case
    lhs, rhs, gs, dy = _inputs(M, K, N, sizes, dtype)
    got = jax.jit(lambda *a: _vjp(BACKENDS[backend], *a))(lhs, rhs, gs, dy)
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        want = _vjp(reference.grouped_matmul, f32(lhs), f32(rhs), gs, f32(dy))
    assert [g.dtype for g in got] == [dtype] * 3
    assert_close(got[0], want[0], dtype, K, what="y")
    assert_close(got[1], want[1], dtype, N, what="dlhs")
    assert_close(got[2], want[2], dtype, max(sizes), what="drhs")
    total = sum(sizes)
    assert not np.any(np.asarray(got[0][total:], np.float32)), "rows past the last group must be 0"
    for g, n in enumerate(sizes):
        if n == 0:
            assert not np.any(np.asarray(got[2][g], np.float32)), "an empty group's weight gradient is 0"


def test_reference_is_a_per_row_loop():
    lhs, rhs, gs, _ = _inputs(9, 8, 5, (2, 0, 4), jnp.float32)
    out = np.asarray(reference.grouped_matmul(lhs, rhs, gs))
    groups = [0, 0, 2, 2, 2, 2]
    for r in range(9):
        want = np.asarray(lhs[r]) @ np.asarray(rhs[groups[r]]) if r < 6 else np.zeros(5)
        np.testing.assert_allclose(out[r], want, rtol=1e-5, atol=1e-5)


def test_rerun_is_bit_identical():
    lhs, rhs, gs, _ = _inputs(70, 256, 128, (10, 0, 33, 7, 17), jnp.bfloat16)
    fn = jax.jit(BACKENDS["pallas_tpu_interpret"])
    np.testing.assert_array_equal(np.asarray(fn(lhs, rhs, gs), np.float32), np.asarray(fn(lhs, rhs, gs), np.float32))


def test_visits_cover_each_group_tile_once():
    gs = jnp.asarray([10, 0, 33, 7, 17], jnp.int32)
    offsets, group_of, tile_of, n = pallas_tpu.visits(gs, 80, 16, visit_empty=False)
    pairs = list(zip(np.asarray(group_of)[: int(n)].tolist(), np.asarray(tile_of)[: int(n)].tolist()))
    want = [(g, t) for g, (s, e) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())) if e > s
            for t in range(s // 16, (e - 1) // 16 + 1)]
    assert pairs == want


def test_registry_picks_by_target_and_override():
    cpu = KernelPolicy.create(Target("cpu"))
    assert cpu.pick("grouped_matmul", m=8, k=8, n=8, groups=2, dtype="float32").name == "xla_tiled"
    gpu = KernelPolicy.create(Target("gpu", "NVIDIA H100"))
    assert gpu.pick("grouped_matmul", m=8, k=8, n=8, groups=2, dtype="float32").name == "xla"
    tpu = KernelPolicy.create(Target("tpu", "TPU v6 lite"))
    assert tpu.pick("grouped_matmul", m=256, k=512, n=1024, groups=8, dtype="bfloat16").name == "pallas_tpu"
    interp = cpu.with_overrides(grouped_matmul="pallas_tpu_interpret")
    lhs, rhs, gs, _ = _inputs(40, 128, 256, (0, 40, 0), jnp.float32)
    np.testing.assert_allclose(api.grouped_matmul(lhs, rhs, gs, policy=interp),
                               api.grouped_matmul(lhs, rhs, gs, policy=cpu), rtol=1e-5, atol=1e-5)


def _v6e_args(M: int, K: int, N: int, G: int) -> tuple:
    """Abstract (lhs, rhs, group_sizes) on one device of a deviceless v6e topology (skips without libtpu)."""
    topologies = pytest.importorskip("jax.experimental.topologies")
    pytest.importorskip("libtpu")
    from jax.sharding import SingleDeviceSharding

    s = SingleDeviceSharding(topologies.get_topology_desc("v6e:2x2", platform="tpu").devices[0])
    return (jax.ShapeDtypeStruct((M, K), jnp.bfloat16, sharding=s), jax.ShapeDtypeStruct((G, K, N), jnp.bfloat16, sharding=s),
            jax.ShapeDtypeStruct((G,), jnp.int32, sharding=s))


def test_tpu_kernels_compile_deviceless_with_estimate():
    """Pallas (Mosaic custom calls) vs XLA's ragged dot for one MoE-sized expert matmul on a v6e
    topology: both compile, and the Pallas program's cost analysis carries the kernels' CostEstimate."""
    M, K, N, G = 2048, 1024, 2048, 8
    args = _v6e_args(M, K, N, G)
    costs = {}
    for name, fn in (("pallas_tpu", pallas_tpu.grouped_matmul), ("xla", xla.grouped_matmul)):
        loss = lambda a, b, g, fn=fn: fn(a, b, g).astype(jnp.float32).sum()  # noqa: E731
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
        text = compiled.as_text()
        costs[name] = dict(compiled.cost_analysis(), tgmm="grouped_matmul_tgmm" in text,
                           custom_calls=text.count("tpu_custom_call"))
    # fwd + dlhs + drhs, each 2*M*K*N: what the three CostEstimates declare.
    assert costs["pallas_tpu"]["flops"] >= 3 * 2 * M * K * N
    assert costs["pallas_tpu"]["tgmm"] and not costs["xla"]["tgmm"]  # our Mosaic kernels only in the Pallas program
    assert costs["pallas_tpu"]["custom_calls"] >= 3
    print({n: {k: f"{c[k]:.3g}" for k in ("flops", "bytes accessed")} for n, c in costs.items()})


def test_tpu_kernels_declare_the_rows_hint():
    """An expert-parallel receive buffer padded to ep x the rows balanced routing sends: with rows=M/8 the
    three kernels (fwd, dlhs, drhs) declare 3 x 2 x (M/8) x K x N FLOPs, as the estimator reads them."""
    from polychip.estimate.hlo import ops_from_hlo

    M, K, N, G = 2048, 512, 512, 4
    args = _v6e_args(M, K, N, G)
    declared = {}
    for rows in (None, M // 8):
        loss = lambda a, b, g, rows=rows: pallas_tpu.grouped_matmul(a, b, g, rows=rows).astype(jnp.float32).sum()  # noqa: E731
        text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile().as_text()
        declared[rows] = sum(o.flops * o.count for o in ops_from_hlo(text, 1) if o.source == "declared")
    assert declared[None] == 3 * 2 * M * K * N
    assert declared[M // 8] == 3 * 2 * (M // 8) * K * N

"""The same train step on 8 simulated CPU devices under different meshes: same numbers, real sharding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from polychip.config import build_config
from polychip.parallel.mesh import make_mesh, resolve_shape
from polychip.parallel.sharding import Layout, ShardingError
from tests.conftest import steps_and_grads

MESHES = [(1, 1, 1), (8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]


def _cfg(mesh):
    d, f, t = mesh
    return build_config("tiny", overrides=[
        f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}", f"mesh.num_devices={d * f * t}",
        "train.batch_size=8", "train.seq_len=32", "train.warmup_steps=0", "train.lr=1e-2", "train.steps=3"])


def _run(mesh, n_steps=3):
    return steps_and_grads(_cfg(mesh), n_steps)[:3]


@pytest.fixture(scope="module")
def baseline():
    return _run((1, 1, 1))


@pytest.mark.parametrize("mesh", MESHES[1:], ids=lambda m: "x".join(map(str, m)))
def test_losses_and_grads_agree_across_meshes(baseline, mesh):
    base_losses, base_grads, _ = baseline
    losses, grads, state = _run(mesh)
    # fp32 on CPU; differences come only from reduction order across shards.
    np.testing.assert_allclose(losses, base_losses, rtol=2e-5, atol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, base_grads)


def test_parameters_are_really_sharded():
    _, _, state = _run((1, 2, 4), n_steps=1)
    p = state["params"]
    wq = p["layers"]["wq"]  # [L, D, H, Dh] = (layers, embed, heads, head_dim)
    assert wq.sharding.spec == P(None, "fsdp", "tensor", None)
    L, D, H, Dh = wq.shape
    assert {s.data.shape for s in wq.addressable_shards} == {(L, D // 2, H // 4, Dh)}
    # 2 KV heads cannot split 4 ways: that dimension is replicated, embed still sharded over fsdp.
    wk = p["layers"]["wk"]
    assert wk.sharding.spec == P(None, "fsdp", None, None)
    emb = p["embed"]  # (vocab, embed)
    assert emb.sharding.spec == P("tensor", "fsdp")
    # Adam moments follow their parameters.
    mu = state["opt_state"][1][0].mu["layers"]["wq"]
    assert mu.sharding.spec == wq.sharding.spec
    assert len(wq.sharding.device_set) == 8


def test_rule_override_changes_layout():
    cfg = _cfg((1, 2, 4))
    layout = Layout.create(make_mesh(cfg.mesh), {"mlp": None})
    assert layout.spec(("layers", "embed", "mlp"), (2, 64, 192)) == P(None, "fsdp", None)
    with pytest.raises(ShardingError, match="unknown logical axis"):
        Layout.create(make_mesh(cfg.mesh), {"bogus": "tensor"})
    with pytest.raises(ShardingError, match="names mesh axis"):
        Layout.create(make_mesh(cfg.mesh), {"mlp": "nope"})


def test_mesh_errors():
    cfg = build_config("tiny", overrides=["mesh.data=3", "mesh.fsdp=1"])
    with pytest.raises(ShardingError, match="has 3 devices but 8 are available"):
        make_mesh(cfg.mesh)
    assert resolve_shape(build_config("tiny", overrides=["mesh.tensor=2"]).mesh, 8) == {
        "data": 1, "stage": 1, "fsdp": 4, "context": 1, "expert": 1, "tensor": 2}
    with pytest.raises(ShardingError, match="not divisible"):
        resolve_shape(build_config("tiny", overrides=["mesh.tensor=3"]).mesh, 8)

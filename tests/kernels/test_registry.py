"""The kernel registry: priority order, explicit overrides with reasons, XLA attention vs reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polychip.kernels import KernelError, KernelPolicy, Target, implementations, ops, register, resolve
from polychip.kernels.registry import Op, declare
from polychip.kernels.attention import attention
from polychip.kernels.attention import reference as ref_attn


def test_every_op_has_a_reference():
    assert {"attention", "rms_norm", "cross_entropy"} <= set(ops())
    for op in ops():
        assert "reference" in [i.name for i in implementations(op)], op


def test_auto_picks_first_supported_and_override_explains():
    cpu = Target("cpu")
    assert resolve("attention", cpu, {"q_len": 8, "kv_len": 8, "causal": True}).name != "reference"
    gpu = Target("gpu")
    assert resolve("attention", gpu, {"q_len": 8, "kv_len": 8, "causal": True}, override="sdpa").name == "sdpa"
    # soft-cap: sdpa declines, the registry falls through (never silently to an unsupported one)
    q = {"q_len": 8, "kv_len": 8, "soft_cap": 30.0, "dtype": "float32", "head_dim": 16}
    got = resolve("attention", gpu, q)
    assert got.name != "sdpa" and got.supported_on(gpu, q) is None
    with pytest.raises(KernelError, match="sdpa.*cannot run on gpu: logit soft-cap"):
        resolve("attention", gpu, q, override="sdpa")
    with pytest.raises(KernelError, match="not registered; available"):
        resolve("attention", cpu, {}, override="nonexistent")
    with pytest.raises(KernelError, match="unknown kernel op"):
        resolve("no_such_op", cpu, {})


def test_a_registered_backend_is_chosen_by_supported_on():
    calls = []
    register("test_op", "reference", priority=100)(lambda x: ("ref", x))
    register("test_op", "tpu_only", priority=10, supported_on=lambda t, q: None if t.platform == "tpu" else "needs TPU")(
        lambda x: calls.append(x) or ("tpu", x))
    assert KernelPolicy.create(Target("cpu")).pick("test_op").name == "reference"
    assert KernelPolicy.create(Target("tpu")).pick("test_op").name == "tpu_only"
    with pytest.raises(KernelError, match="tpu_only.*needs TPU"):
        KernelPolicy.create(Target("cpu"), {"test_op": "tpu_only"}).pick("test_op")


@pytest.mark.parametrize("H,K", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("window", [None, 5])
def test_xla_attention_matches_reference(H, K, window):
    q = jax.random.normal(jax.random.key(0), (2, 19, H, 16))
    k = jax.random.normal(jax.random.key(1), (2, 19, K, 16))
    v = jax.random.normal(jax.random.key(2), (2, 19, K, 16))
    pol = KernelPolicy.create(Target("cpu"), {"attention": "xla"})
    out = attention(q, k, v, policy=pol, sliding_window=window)
    want = ref_attn.attention(q, k, v, sliding_window=window)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
    from polychip.kernels.attention.xla import sdpa

    np.testing.assert_allclose(sdpa(q, k, v, sliding_window=window), want, atol=2e-5, rtol=2e-5)


def test_non_auto_implementations_are_only_used_when_named():
    register("test_op2", "reference", priority=100)(lambda x: x)
    register("test_op2", "unproven", priority=1, auto=False)(lambda x: x)
    assert KernelPolicy.create(Target("cpu")).pick("test_op2").name == "reference"
    assert KernelPolicy.create(Target("cpu"), {"test_op2": "unproven"}).pick("test_op2").name == "unproven"


def test_kernels_with_tuning_receive_the_target_device_kind():
    op = Op("test_op3", (("x", ("batch",)),))
    register("test_op3", "tuned", priority=1, wants_device_kind=True)(lambda x, device_kind=None: (x, device_kind))
    register("test_op3", "plain", priority=2)(lambda x, **kw: (x, kw))
    pol = KernelPolicy.create(Target("tpu", "TPU v6 lite"))
    assert pol.call(op, 1, query={}) == (1, "TPU v6 lite")
    assert pol.with_overrides(test_op3="plain").call(op, 1, query={}) == (1, {})


def _mesh_layout():
    from polychip.config import build_config
    from polychip.parallel.mesh import make_mesh
    from polychip.parallel.sharding import Layout

    cfg = build_config("tiny", overrides=["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    return Layout.create(make_mesh(cfg.mesh), cfg.mesh.rules)


def _seen_shapes(op, fn, calls):
    """A manual_partition test implementation of `op` that records the shapes it is called with."""
    def spy(*args, **kw):
        calls.append(tuple(a.shape for a in args) + tuple((k, v.shape) for k, v in kw.items() if hasattr(v, "shape")))
        return fn(*args, **kw)

    register(op, "spy", priority=1, auto=False, manual_partition=True)(spy)
    return spy


def _paged_inputs(B=8, H=8, K=2, D=16, ps=4, M=3):
    rng = np.random.default_rng(0)
    P = B * M
    q = jnp.asarray(rng.normal(size=(B, H, D)), jnp.float32)
    kp = jnp.asarray(rng.normal(size=(K, P, ps, D)), jnp.float32)
    vp = jnp.asarray(rng.normal(size=(K, P, ps, D)), jnp.float32)
    bt = jnp.asarray(rng.permutation(P).reshape(B, M), jnp.int32)
    return q, kp, vp, bt, jnp.asarray(rng.integers(0, M * ps + 1, B), jnp.int32)


def test_manual_partition_paged_attention_runs_per_shard_on_a_mesh():
    """Paged attention goes through the one call path: a manual_partition implementation runs per shard
    (each device sees its sequences and its kv heads' query heads) and gives the unsharded result."""
    from polychip.kernels.paged_attention import paged_attention, reference as paged_ref

    calls = []
    _seen_shapes("paged_attention", paged_ref.paged_attention, calls)
    layout = _mesh_layout()
    pol = KernelPolicy.create(Target("cpu"), {"paged_attention": "spy"})
    args = _paged_inputs()
    want = paged_ref.paged_attention(*args, soft_cap=5.0)
    got = jax.jit(lambda *a: paged_attention(*a, policy=pol.with_layout(layout), soft_cap=5.0))(*args)
    # batch 8 over data x fsdp (4), heads over tensor (2): q [2, 4, 16], pages [1, 24, 4, 16], tables [2, 3]
    assert calls[-1] == ((2, 4, 16), (1, 24, 4, 16), (1, 24, 4, 16), (2, 3), (2,))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    calls.clear()
    assert np.array_equal(paged_attention(*args, policy=pol, soft_cap=5.0), want)  # no layout: one plain call
    assert calls == [((8, 8, 16), (2, 24, 4, 16), (2, 24, 4, 16), (8, 3), (8,))]


def test_every_op_runs_per_shard_through_the_call_path():
    """Each op's public function, with a manual_partition implementation named, runs it per shard."""
    from polychip.kernels.cross_entropy import cross_entropy, reference as ce_ref
    from polychip.kernels.rms_norm import reference as rms_ref, rms_norm

    layout = _mesh_layout()
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(8, 5, 16)), jnp.float32)
    q, k = jnp.asarray(rng.normal(size=(8, 6, 4, 16)), jnp.float32), jnp.asarray(rng.normal(size=(8, 6, 2, 16)), jnp.float32)
    h, w = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32), jnp.asarray(rng.normal(size=(16, 11)), jnp.float32)
    labels, mask = jnp.asarray(rng.integers(0, 11, 8), jnp.int32), jnp.ones((8,), jnp.float32)
    cases = {
        "rms_norm": (rms_ref.rms_norm, lambda p: rms_norm(x, x[0, 0], eps=1e-5, policy=p),
                     rms_ref.rms_norm(x, x[0, 0], eps=1e-5), (2, 5, 16)),
        "attention": (ref_attn.attention, lambda p: attention(q, k, k, policy=p, q_offset=jnp.arange(8)),
                      ref_attn.attention(q, k, k, q_offset=jnp.arange(8)), (2, 6, 2, 16)),
        "cross_entropy": (ce_ref.cross_entropy, lambda p: cross_entropy(h, w, labels, mask, policy=p),
                          ce_ref.cross_entropy(h, w, labels, mask), (2, 16)),
    }
    for op, (ref, run, want, local) in cases.items():
        calls = []
        _seen_shapes(op, ref, calls)
        pol = KernelPolicy.create(Target("cpu"), {op: "spy"}).with_layout(layout)
        got = jax.jit(lambda: run(pol))()
        assert calls and calls[-1][0] == local, (op, calls)
        jax.tree.map(lambda g, w_: np.testing.assert_allclose(g, w_, rtol=1e-5, atol=1e-5), got, want)


def test_gqa_heads_split_only_when_query_and_kv_heads_split_alike():
    from polychip.kernels.registry import shard_specs

    layout = _mesh_layout()
    bthd = ("batch", None, "act_heads", None)
    alike = shard_specs(layout, (bthd, bthd), ((8, 4, 4, 8), (8, 4, 2, 8)))
    assert alike[0] == alike[1] and alike[0][2] == "tensor"
    mqa = shard_specs(layout, (bthd, bthd), ((8, 4, 4, 8), (8, 4, 1, 8)))  # 1 kv head cannot split
    assert mqa[0][2] is None and mqa[1][2] is None and mqa[0][0] == ("data", "fsdp")


def test_declared_axes():
    op = Op("x", (("a", ("batch", ...)), ("b", ("batch",))))
    assert op.axes("a", 3) == ("batch", None, None) and op.axes("b", 0) == ()
    with pytest.raises(ValueError, match="2 dimensions"):
        op.axes("b", 2)


def test_a_missing_toolchain_drops_its_backend_and_our_import_errors_are_raised(monkeypatch):
    import sys

    from polychip.kernels import registry
    from polychip.kernels.rms_norm import reference as rms_ref

    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)  # "Triton is not installed"
    monkeypatch.delitem(sys.modules, "polychip.kernels.rms_norm.pallas_gpu")
    declare("rms_norm", reference=rms_ref.rms_norm, backends=("pallas_tpu", "pallas_gpu"), args={})
    assert [i.name for i in registry._REGISTRY["rms_norm"]] == ["pallas_tpu", "reference", "pallas_tpu_interpret"]
    with pytest.raises(ImportError, match="no_such_backend"):
        declare("rms_norm", reference=rms_ref.rms_norm, backends=("no_such_backend",), args={})

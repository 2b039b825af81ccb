"""The kernel registry: priority order, explicit overrides with reasons, XLA attention vs reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polychip.kernels import KernelError, KernelPolicy, Target, implementations, ops, register, resolve
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
    register("test_op3", "tuned", priority=1, wants_device_kind=True)(lambda x, device_kind=None: (x, device_kind))
    pol = KernelPolicy.create(Target("tpu", "TPU v6 lite"))
    assert pol.pick("test_op3").call(pol.target, 1) == (1, "TPU v6 lite")

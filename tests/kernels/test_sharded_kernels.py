"""Kernels XLA cannot partition (Pallas/Mosaic custom calls) run per shard under shard_map on a mesh."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polychip.config import build_config
from polychip.kernels.registry import KernelPolicy, Target
from polychip.parallel.mesh import make_mesh
from polychip.parallel.sharding import Layout
from polychip.train.step import StepSpec
from tests.conftest import random_batches, run_train_steps

# The generic Pallas interpreter (the GPU kernels' interpret mode) runs under shard_map on the 8 CPU
# devices. Mosaic's TPU interpreter does not (it hung for 15 minutes here): the TPU kernels' per-shard
# wrapping is checked by the deviceless multi-chip compile below instead.
INTERP = {"attention": "pallas_gpu_interpret", "rms_norm": "pallas_gpu_interpret"}


def _losses(overrides, mesh, steps=2):
    d, f, t = mesh
    cfg = build_config("tiny", overrides=[f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}",
                                          f"mesh.num_devices={d * f * t}", "train.batch_size=8", "train.seq_len=32",
                                          "train.warmup_steps=0", "train.steps=4",
                                          *(f"kernels.{op}={name}" for op, name in overrides.items())])
    losses, spec, state, b = run_train_steps(cfg, random_batches(cfg, steps))
    return losses, spec.jitted, state, b


def test_interpreted_pallas_kernels_on_a_2x2x2_mesh_match_the_reference():
    want, *_ = _losses({}, (1, 1, 1))
    got, fn, state, b = _losses(INTERP, (2, 2, 2))
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # the shard_map is really there: the kernels run on per-device shards
    hlo = fn.lower(state, b).as_text()
    assert "shard_map" in hlo or "sdy.manual_computation" in hlo or "custom_call_target=\"Sharding\"" in hlo


def test_tpu_train_step_with_pallas_kernels_compiles_for_a_multichip_topology():
    """Without shard_map, Mosaic kernels stop any multi-chip compile ("cannot be automatically partitioned")."""
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    cfg = build_config("tiny", overrides=["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "train.batch_size=8",
                                          "train.seq_len=128", "train.compute_dtype=bfloat16"])
    spec = StepSpec.build(cfg, devices=devices, target=Target("tpu", devices[0].device_kind))
    assert spec.runtime.policy.pick("attention", q_len=128, kv_len=128, n_heads=4, n_kv_heads=2, head_dim=16,
                       dtype="bfloat16", causal=True).name == "pallas_tpu"
    text = spec.jitted.lower(spec.sharded_abstract_state(), spec.abstract_batch).compile().as_text()
    assert text.count("tpu_custom_call") >= 3  # Mosaic kernels (attention fwd/bwd, norm, loss) inside


def test_per_shard_partial_sums_and_their_gradients_are_exact():
    """Loss sums computed per batch shard and psum-ed: value and gradients equal the unsharded ones."""
    import dataclasses

    from polychip.kernels.cross_entropy import reference as ce_ref
    from polychip.kernels.registry import Impl

    cfg = build_config("tiny", overrides=["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    layout = Layout.create(make_mesh(cfg.mesh), cfg.mesh.rules)
    pol = KernelPolicy.create(Target.of()).with_layout(layout)
    impl = Impl("cross_entropy", "manual_ref", ce_ref.cross_entropy, lambda t, q: None, 1, manual_partition=True)
    plain = dataclasses.replace(impl, manual_partition=False)
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(32, 100)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 100, 64), jnp.int32)
    mask = jnp.ones((64,), jnp.float32)
    axes = (("batch", None), (None, None), ("batch",), ("batch",))

    def loss(impl, h, w):
        s, c = pol.per_shard(impl, impl.fn, (h, w, labels, mask), axes, psum_outputs=True)
        return s / c

    f_sh = jax.jit(jax.value_and_grad(lambda h, w: loss(impl, h, w), argnums=(0, 1)))
    f_pl = jax.jit(jax.value_and_grad(lambda h, w: loss(plain, h, w), argnums=(0, 1)))
    (v1, (gh1, gw1)), (v2, (gh2, gw2)) = f_sh(h, w), f_pl(h, w)
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    np.testing.assert_allclose(gh1, gh2, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gw1, gw2, rtol=1e-5, atol=1e-7)

"""The train step: gradient accumulation, mixed precision, donation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polychip.config import ConfigError, build_config
from polychip.train.step import StepSpec
from tests.conftest import random_batches, run_train_steps


def _run(*overrides, steps=3):
    cfg = build_config("tiny", overrides=["mesh.num_devices=2", "train.batch_size=8", "train.seq_len=32",
                                          "train.warmup_steps=0", "train.steps=10", *overrides])
    losses, _, state, _ = run_train_steps(cfg, random_batches(cfg, steps, seed=1))
    return losses, state


def test_grad_accumulation_matches_one_big_batch():
    l1, s1 = _run()
    l2, s2 = _run("train.grad_accum=4")
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5), jax.device_get(s2["params"]),
                 jax.device_get(s1["params"]))


def test_bf16_compute_keeps_fp32_master_weights():
    l32, _ = _run(steps=4)
    l16, s16 = _run("train.compute_dtype=bfloat16", steps=4)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16["params"]))
    np.testing.assert_allclose(l16, l32, rtol=3e-2)
    assert l16[-1] < l16[0]


def test_bf16_params_and_remat_run():
    l, s = _run("train.param_dtype=bfloat16", "train.compute_dtype=bfloat16", "train.remat=full", steps=3)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(s["params"]))
    assert np.isfinite(l).all()


def test_state_is_donated():
    cfg = build_config("tiny", overrides=["mesh.num_devices=1", "train.batch_size=8", "train.seq_len=32"])
    spec = StepSpec.build(cfg)
    state = spec.init_state()
    old = state["params"]["embed"]
    spec.jitted(state, spec.put_batch(np.zeros((8, 33), np.int32)))
    assert old.is_deleted()


def test_one_builder_builds_each_artefact_once():
    """The optimizer, abstract state and shardings are built once per spec and shared by every artefact."""
    cfg = build_config("tiny", overrides=["mesh.num_devices=2", "train.batch_size=8", "train.seq_len=32"])
    spec = StepSpec.build(cfg)
    assert spec.optimizer is spec.optimizer and spec.shardings is spec.shardings and spec.jitted is spec.jitted
    state = spec.init_state()
    # init_state lands exactly where the jitted step expects its (donated) input
    jax.tree.map(lambda x, sh: x.sharding.is_equivalent_to(sh, x.ndim) or pytest.fail(f"{x.sharding} != {sh}"),
                 state, spec.shardings)
    assert spec.abstract_batch.shape == (8, 33) and spec.abstract_batch.sharding == spec.batch_sharding


@pytest.mark.parametrize("overrides, msg", [
    (["train.batch_size=6", "mesh.fsdp=4", "mesh.num_devices=4"], "not divisible by the data-parallel ways 4"),
    (["mesh.tensor=8", "mesh.num_devices=8"], "model.n_heads=4 is not divisible by mesh.tensor=8"),
])
def test_builder_refuses_shapes_the_mesh_cannot_split(overrides, msg):
    cfg = build_config("tiny", overrides=["train.batch_size=8", "mesh.fsdp=-1", *overrides])
    with pytest.raises(ConfigError, match=msg):
        StepSpec.build(cfg)


def test_weight_decay_skips_norms_and_biases():
    from polychip.model import transformer as T
    from polychip.train.optim import decay_mask

    cfg = build_config("tiny", overrides=["model.qkv_bias=true"])
    mask = decay_mask(T.abstract_params(cfg.model, jnp.float32))
    assert mask["layers"]["wq"] and mask["embed"]
    assert not any(mask["layers"][k] for k in ("bq", "bk", "bv", "attn_norm", "mlp_norm")) and not mask["final_norm"]

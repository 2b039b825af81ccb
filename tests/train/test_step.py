"""The train step: gradient accumulation, mixed precision, donation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polychip.config import build_config
from polychip.kernels.registry import KernelPolicy, Target
from polychip.parallel.mesh import make_mesh
from polychip.parallel.sharding import Layout
from polychip.train import step as S


def _run(*overrides, steps=3):
    cfg = build_config("tiny", overrides=["mesh.num_devices=2", "train.batch_size=8", "train.seq_len=32",
                                          "train.warmup_steps=0", "train.steps=10", *overrides])
    layout = Layout.create(make_mesh(cfg.mesh), cfg.mesh.rules)
    rt = S.make_runtime(cfg, KernelPolicy.create(Target.of()), layout)
    sh = S.state_shardings(cfg, layout)
    state = S.init_state(cfg, layout)
    fn = S.jit_train_step(cfg, rt, sh)
    rng = np.random.default_rng(1)
    losses = []
    for _ in range(steps):
        b = jax.device_put(rng.integers(0, cfg.model.vocab_size, (8, 33), dtype=np.int32), S.batch_sharding(layout))
        state, m = fn(state, b)
        losses.append(float(m["loss"]))
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
    layout = Layout.create(make_mesh(cfg.mesh), cfg.mesh.rules)
    rt = S.make_runtime(cfg, KernelPolicy.create(Target.of()), layout)
    sh = S.state_shardings(cfg, layout)
    state = S.init_state(cfg, layout)
    fn = S.jit_train_step(cfg, rt, sh)
    b = jax.device_put(np.zeros((8, 33), np.int32), S.batch_sharding(layout))
    old = state["params"]["embed"]
    fn(state, b)
    assert old.is_deleted()

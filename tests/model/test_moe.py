"""Mixture-of-experts: routing and combination vs a per-token Python loop, auxiliary losses vs a hand
computation, config validation, parameter counts, and an exact resume of a moe-tiny run."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polychip.config import MODEL_PRESETS, ConfigError, build_config
from polychip.kernels import KernelPolicy
from polychip.model import moe
from polychip.model import transformer as T

RT = T.Runtime(KernelPolicy.create())
TINY = MODEL_PRESETS["moe-tiny"]


def _layer(cfg, seed=0):
    params = T.init_params(cfg, jax.random.key(seed))
    lp = jax.tree.map(lambda a: a[0], params["layers"])
    # Router weights large enough that the top-k is decided by clear margins, not rounding.
    lp["moe_router"] = jax.random.normal(jax.random.key(seed + 1), lp["moe_router"].shape)
    h = jax.random.normal(jax.random.key(seed + 2), (2, 5, cfg.d_model))
    return h, {k: np.asarray(v, np.float64) for k, v in lp.items()}, lp


def _swiglu(x, wg, wu, wd):
    g = x @ wg
    return ((g / (1 + np.exp(-g))) * (x @ wu)) @ wd


def _loop(h, lp, cfg):
    """The MoE layer one token at a time, in float64 numpy."""
    out = np.zeros(h.shape)
    for b in range(h.shape[0]):
        for t in range(h.shape[1]):
            x = np.asarray(h[b, t], np.float64)
            z = x @ lp["moe_router"]
            p = np.exp(z - z.max()) / np.exp(z - z.max()).sum() if cfg.router_gate == "softmax" else 1 / (1 + np.exp(-z))
            top = sorted(range(cfg.n_experts), key=lambda e: -p[e])[:cfg.experts_per_token]
            gates = p[top] / (p[top].sum() if cfg.router_norm_topk else 1.0)
            y = sum(g * _swiglu(x, lp["moe_gate"][e], lp["moe_up"][e], lp["moe_down"][e]) for g, e in zip(gates, top))
            if cfg.n_shared_experts:
                s = _swiglu(x, lp["shared_gate"], lp["shared_up"], lp["shared_down"])
                if cfg.shared_expert_gate:
                    s = s / (1 + np.exp(-(x @ lp["shared_router"])))
                y = y + s
            out[b, t] = y
    return out


VARIANTS = {
    "softmax-top2-shared": {},
    "sigmoid-top3": dict(router_gate="sigmoid", experts_per_token=3, n_shared_experts=0),
    "softmax-unnormalised-gated-shared": dict(router_norm_topk=False, shared_expert_gate=True),
    "top1": dict(experts_per_token=1, n_shared_experts=0),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_layer_matches_a_per_token_loop(variant):
    cfg = dataclasses.replace(TINY, **VARIANTS[variant])
    h, lp64, lp = _layer(cfg)
    with jax.default_matmul_precision("highest"):
        y, _ = moe.feed_forward(h, lp, cfg, RT, jax.nn.silu)
    np.testing.assert_allclose(np.asarray(y), _loop(h, lp64, cfg), rtol=1e-4, atol=1e-6)


def test_route_picks_top_k_and_gates():
    cfg = dataclasses.replace(TINY, n_experts=4, experts_per_token=2)
    z = jnp.array([[0.0, 3.0, 1.0, 2.0], [5.0, -1.0, 4.0, 0.0]])
    experts, gates, _ = moe.route(z, jnp.eye(4), cfg)  # router = I: the logits are z
    np.testing.assert_array_equal(np.asarray(experts)[:2], [[1, 3], [0, 2]])
    np.testing.assert_allclose(np.asarray(gates)[0], [np.e / (np.e + 1), 1 / (np.e + 1)], rtol=1e-6)


def test_aux_losses_match_hand_computation():
    cfg = dataclasses.replace(TINY, n_experts=3, experts_per_token=1)
    z = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [3.0, 0.0, 1.0], [0.0, 0.0, 0.5]])
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    f = np.array([2, 1, 1]) / 4  # experts picked: 0, 1, 0, 2
    want_lb = 3 * np.sum(f * p.mean(0))
    want_z = np.mean(np.log(np.exp(z).sum(1)) ** 2)
    _, _, aux = moe.route(jnp.asarray(z), jnp.eye(3), cfg)
    np.testing.assert_allclose(float(aux["moe_lb_loss"]), want_lb, rtol=1e-6)
    np.testing.assert_allclose(float(aux["moe_z_loss"]), want_z, rtol=1e-6)
    uniform = moe.aux_losses(jnp.zeros((6, 3)), jnp.full((6, 3), 1 / 3), jnp.array([[0], [1], [2]] * 2), cfg)
    np.testing.assert_allclose(float(uniform["moe_lb_loss"]), 1.0, rtol=1e-6)  # balanced: exactly 1


def test_objective_adds_weighted_aux_losses():
    cfg = TINY
    params = T.init_params(cfg, jax.random.key(0))
    batch = jax.random.randint(jax.random.key(1), (2, 17), 0, cfg.vocab_size)
    objective, m = T.loss_and_metrics(params, batch, cfg, RT)
    assert float(m["moe_lb_loss"]) > 0.9 and float(m["moe_z_loss"]) > 0
    want = float(m["loss"]) + cfg.router_aux_loss * float(m["moe_lb_loss"]) + cfg.router_z_loss * float(m["moe_z_loss"])
    assert float(objective) == pytest.approx(want, rel=1e-6)
    # The aux terms move the router: their gradient alone is non-zero on it.
    g = jax.grad(lambda p: T.loss_and_metrics(p, batch, cfg, RT)[1]["moe_aux_loss"])(params)
    assert float(jnp.abs(g["layers"]["moe_router"]).max()) > 0


def test_param_count_matches_the_tree():
    for name in ("moe-tiny", "moe-small", "mixtral-8x7b", "deepseek-v3"):
        cfg = MODEL_PRESETS[name]
        n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(T.abstract_params(cfg)))
        assert n == cfg.n_params, name
    assert 46.0e9 < MODEL_PRESETS["mixtral-8x7b"].n_params < 47.0e9  # Mixtral 8x7B: 46.7B


@pytest.mark.parametrize("override,msg", [
    ("model.experts_per_token=5", "experts_per_token"), ("model.router_gate=relu", "router_gate"),
    ("model.router_z_loss=-1", "router_z_loss"), ("model.n_experts=0", "n_shared_experts"),
])
def test_bad_moe_config_is_one_line_error(override, msg):
    with pytest.raises(ConfigError, match=msg):
        build_config("moe-tiny", overrides=[override])


def test_resume_of_a_moe_run_is_exact(tmp_path):
    from polychip.train.loop import train

    common = ["data.max_bytes=200000", "train.steps=6", "train.checkpoint_every=0", "train.warmup_steps=2",
              "mesh.num_devices=1"]
    straight = train(build_config("moe-tiny", overrides=[f"out_dir={tmp_path / 'a'}", *common]), log=lambda *a: None)
    out = tmp_path / "b"
    first = train(build_config("moe-tiny", overrides=[f"out_dir={out}", *common]), log=lambda *a: None, stop_after=3)
    second = train(build_config("moe-tiny", overrides=[f"out_dir={out}", *common]), log=lambda *a: None)
    assert second.resumed_from == 3 and first.losses + second.losses == straight.losses
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(second.state["params"]),
                 jax.device_get(straight.state["params"]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7)) and all("moe_aux_loss" in r for r in rows)


def test_flops_count_active_parameters():
    from polychip.model.flops import matmul_params, train_flops_per_token

    small, moe_small, mixtral = (MODEL_PRESETS[n] for n in ("small", "moe-small", "mixtral-8x7b"))
    # moe-small stores 2.3x small's weights but each token uses as many (plus a 256x8 router per layer).
    assert moe_small.n_params > 2 * small.n_params
    assert train_flops_per_token(moe_small, 256) - train_flops_per_token(small, 256) == 6 * 4 * 256 * 8
    # Mixtral 8x7B: 12.9B active parameters (Jiang et al. 2024), embedding included.
    assert 12.8e9 < matmul_params(mixtral) + mixtral.vocab_size * mixtral.d_model < 13.0e9

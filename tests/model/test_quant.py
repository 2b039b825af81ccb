"""Weight-only int8 (model/quant.py) and the soft-capping options.

Quality bounds for int8 on the tiny random model below (measured: max logit error 2.2% of the largest
logit, teacher-forced greedy agreement 98%): per-channel round-to-nearest moves each weight by at most
scale/2 = max|w|/254, about 0.4% of a Gaussian channel's RMS after the ~3.5-sigma max, and ~10 matmuls
accumulate it, so 5% and 95% leave margin; scales applied to the wrong channels exceed 5% (control).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polychip.config import ConfigError, ModelConfig
from polychip.kernels.registry import KernelPolicy
from polychip.model.quant import QArray, inference_dtypes, is_quantized, quantize, quantize_params
from polychip.model.transformer import Runtime, dense, init_params, logits, loss_fn

RT = Runtime(KernelPolicy.create())


def tiny(**kw) -> ModelConfig:
    kw = {"init_std": 0.1, **kw}
    return ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                       max_seq_len=128, **kw)


def rel_err(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def test_quantize_rounds_each_output_channel_to_its_own_scale():
    w = np.random.default_rng(0).normal(size=(2, 8, 3, 5)).astype(np.float32)  # [lead, in, *out]
    w[1, :, 2, 4] = 0.0  # an all-zero channel must not divide by zero
    qa = quantize(w, 1, n_lead=1)
    assert qa.q.dtype == np.int8 and qa.q.shape == (2, 15, 8) and qa.scale.shape == (2, 15)
    assert qa.shape == w.shape
    amax = np.abs(w).max(axis=1)  # [2, 3, 5]
    scale = np.where(amax > 0, amax / 127, 1.0)
    np.testing.assert_allclose(qa.scale, scale.reshape(2, 15), rtol=1e-6)
    assert np.all(np.abs(np.asarray(qa.astype(np.float32)) - w) <= scale[:, None] / 2 + 1e-7)
    assert np.abs(qa.q).max() == 127 and np.all(qa.q[1, 14] == 0)


@pytest.mark.parametrize("n_in", [1, 2])
def test_dense_applies_scales_after_the_matmul(n_in):
    """dense(x, QArray) (int8 matmul, then N scales) equals dense(x, dequantised weight)."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 6, 10) if n_in == 2 else (24, 10)).astype(np.float32)
    x = jnp.asarray(rng.normal(size=(3, 5, *w.shape[:n_in])).astype(np.float32))
    qa = quantize(jnp.asarray(w), n_in)
    got = dense(x, qa, n_in=n_in)
    want = dense(x, qa.astype(jnp.float32), n_in=n_in)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert rel_err(got, dense(x, jnp.asarray(w), n_in=n_in)) < 0.02


@pytest.mark.parametrize("tie", [True, False])
def test_int8_model_quality_vs_float32(tie):
    cfg = tiny(tie_embeddings=tie)
    params = init_params(cfg, jax.random.key(0))
    qp = quantize_params(params, "int8")
    assert is_quantized(qp) and not is_quantized(params)
    assert isinstance(qp["layers"]["wq"], QArray) and qp["layers"]["attn_norm"].dtype == jnp.float32
    assert isinstance(qp["embed"] if tie else qp["lm_head"], QArray)
    toks = jax.random.randint(jax.random.key(1), (4, 64), 0, cfg.vocab_size)
    f = jax.jit(lambda p, t: logits(p, t, cfg, RT)[0])
    ref, got = f(params, toks), f(qp, toks)
    assert rel_err(got, ref) < 0.05
    agree = float(jnp.mean(jnp.argmax(got, -1) == jnp.argmax(ref, -1)))
    assert agree >= 0.95, f"greedy agreement {agree:.3f}"
    # Control: the same int8 values with each channel's scale replaced by the tensor mean (a scale
    # applied to the wrong channels) must break the bounds above, so they are tight enough to bite.
    wd = qp["layers"]["w_down"]
    wrong = dict(qp, layers=dict(qp["layers"], w_down=QArray(wd.q, jnp.full_like(wd.scale, wd.scale.mean()),
                                                             wd.in_shape, wd.out_shape)))
    assert rel_err(f(wrong, toks), ref) > 0.05


@pytest.mark.parametrize("tie", [True, False])
def test_bf16_weight_only_equals_float32_compute_on_rounded_weights(tie):
    """Weight-only bfloat16 (output-major QArray, no scale) computes exactly what float32 compute on the
    bfloat16-rounded weights computes: the layout changes speed, not the numbers."""
    cfg = tiny(tie_embeddings=tie)
    params = init_params(cfg, jax.random.key(0))
    bp = quantize_params(params, "bf16")
    assert isinstance(bp["layers"]["w_up"], QArray) and bp["layers"]["w_up"].scale is None
    assert bp["layers"]["w_up"].q.dtype == jnp.uint16 and bp["layers"]["attn_norm"].dtype == jnp.float32
    rounded = jax.tree.map(lambda w: w.astype(jnp.bfloat16).astype(jnp.float32) if w.ndim >= 2 else w, params)
    toks = jax.random.randint(jax.random.key(1), (2, 32), 0, cfg.vocab_size)
    f = jax.jit(lambda p, t: logits(p, t, cfg, RT)[0])
    np.testing.assert_allclose(np.asarray(f(bp, toks)), np.asarray(f(rounded, toks)), rtol=2e-5, atol=2e-5)
    assert 0 < rel_err(f(bp, toks), f(params, toks)) < 0.02  # bf16 rounding moved the logits a little
    assert inference_dtypes("bfloat16", "cpu") == ("float32", "float32", "bf16")
    assert inference_dtypes("bfloat16", "gpu") == ("bfloat16", "bfloat16", None)


def test_quantize_host_params_and_errors():
    cfg = tiny()
    host = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0)))
    qp = quantize_params(host)
    assert isinstance(qp["layers"]["w_up"].q, np.ndarray)
    dev = jax.device_put(qp)
    assert isinstance(dev["layers"]["w_up"], QArray) and dev["layers"]["w_up"].q.dtype == jnp.int8
    with pytest.raises(ConfigError, match="already quantised"):
        quantize_params(qp)
    with pytest.raises(ConfigError, match="int4"):
        quantize_params(host, "int4")
    assert inference_dtypes("int8") == ("float32", "float32", "int8")
    with pytest.raises(ConfigError, match="float16"):
        inference_dtypes("float16")


def test_final_softcap_bounds_logits_and_enters_the_loss():
    cfg = tiny(final_softcap=2.0)
    params = init_params(cfg, jax.random.key(0))
    batch = jax.random.randint(jax.random.key(2), (2, 17), 0, cfg.vocab_size)
    lg = logits(params, batch[:, :-1], cfg, RT)[0]
    plain = logits(params, batch[:, :-1], dataclasses.replace(cfg, final_softcap=0.0), RT)[0]
    assert float(jnp.max(jnp.abs(lg))) < 2.0 < float(jnp.max(jnp.abs(plain)))
    np.testing.assert_allclose(np.asarray(lg), np.asarray(2.0 * jnp.tanh(plain / 2.0)), rtol=1e-5, atol=1e-6)
    loss, count = loss_fn(params, batch, cfg, RT)
    want = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg, -1), batch[:, 1:, None], -1))
    assert int(count) == 32 and abs(float(loss) - float(want)) < 1e-5


def test_attn_softcap_changes_attention_only_when_it_binds():
    cfg = tiny(init_std=0.5)
    params = init_params(cfg, jax.random.key(0))
    toks = jax.random.randint(jax.random.key(3), (1, 32), 0, cfg.vocab_size)
    base = logits(params, toks, cfg, RT)[0]
    loose = logits(params, toks, dataclasses.replace(cfg, attn_softcap=1e6), RT)[0]
    tight = logits(params, toks, dataclasses.replace(cfg, attn_softcap=0.5), RT)[0]
    assert rel_err(loose, base) < 1e-5 and rel_err(tight, base) > 1e-2


@pytest.mark.parametrize("mode", [None, "int8", "bf16", "f32"])
def test_unstacked_layers_give_the_stacked_logits_and_cache(mode):
    """The CPU inference layout (per-layer weights, a Python loop, q/k/v and gate/up fused into one weight
    each where they are QArrays) computes what the scanned stack does, for float and quantised weights,
    with and without a KV cache (written in place per layer)."""
    from polychip.model.transformer import fuse_projections, init_cache, unstack_layers

    cfg = tiny()  # GQA (4 query, 2 KV heads): the fused q/k/v splits at unequal widths
    params = init_params(cfg, jax.random.key(0))
    params = params if mode is None else quantize_params(params, mode)
    flat = fuse_projections(unstack_layers(params))
    assert isinstance(flat["layers"], tuple) and len(flat["layers"]) == cfg.n_layers
    fused = {"wqkv", "w_gateup"} <= set(flat["layers"][0])
    assert fused == (mode is not None) and fused != bool({"wq", "wk", "wv", "w_gate", "w_up"} & set(flat["layers"][0]))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    # Separately fused programs: equal up to float32 rounding.
    np.testing.assert_allclose(logits(flat, tokens, cfg, RT)[0], logits(params, tokens, cfg, RT)[0], rtol=1e-5, atol=1e-5)
    rt = Runtime(KernelPolicy.create(), unroll_layers=False)  # the stacked side scans, the other loops
    cache = init_cache(cfg, 2, 16)
    b, cb = logits(params, tokens, cfg, rt, cache=cache, cache_pos=jnp.int32(3))
    for c in (cache, init_cache(cfg, 2, 16, per_layer=True)):  # a stacked cache, or one per layer
        a, ca = logits(flat, tokens, cfg, rt, cache=c, cache_pos=jnp.int32(3))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        if isinstance(ca, tuple):
            ca = {k: jnp.stack([layer[k] for layer in ca]) for k in ("k", "v")}
        for k in ("k", "v"):
            np.testing.assert_allclose(ca[k], cb[k], rtol=1e-5, atol=1e-5)
    for k in ("k", "v"):
        assert float(jnp.abs(cb[k][:, :, 3:12]).min(axis=(0, 1, 3, 4)).min()) > 0  # written at positions 3..11
        assert not np.asarray(cb[k][:, :, :3]).any() and not np.asarray(cb[k][:, :, 12:]).any()

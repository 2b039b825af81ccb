"""Qwen2, Mistral and Gemma through polychip's one block: logit parity with transformers' own
Qwen2ForCausalLM / MistralForCausalLM / GemmaForCausalLM on tiny random configs, both directions
(HF -> load_hf -> polychip, and polychip -> save_hf -> transformers, bit-exact in float32).

Tolerance as in test_hf.py: max|a - b| <= 1e-4 * max(1, max|b|) in float32. Each family also has a
sensitivity control: switching its option off must move the logits by far more than the tolerance,
so a test that passes is one where the option was needed.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polychip.config import ModelConfig
from polychip.kernels.registry import KernelPolicy
from polychip.model.hf import HFError, config_from_hf, config_to_hf, load_hf, save_hf
from polychip.model.transformer import Runtime, init_cache, init_params, logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
B, T, V = 2, 24, 97
WINDOW = 5  # < T, so the window masks most of each row

COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5,
              rope_theta=10000.0, initializer_range=0.1)

# name -> (transformers config class, model class, extra config, option that must matter, its "off" value)
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True), "qkv_bias", False),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW, tie_word_embeddings=False),
                "sliding_window", 0),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(hidden_act="gelu_pytorch_tanh"), "norm_offset", 0.0),
}


def make_hf(family: str, seed: int = 0):
    conf_cls, model_cls, extra, _, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, conf_cls)(**COMMON, **extra))
    model.config._attn_implementation = "eager"
    model.eval()
    with torch.no_grad():
        # HF initialises norms to 1 (Gemma: 0) and biases to 0; randomise them so their mapping is tested.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0.0 if family == "gemma" else 1.0) + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.float().numpy()


_jit = jax.jit(lambda p, t, cfg: logits(p, t, cfg, Runtime(KernelPolicy.create()))[0], static_argnums=2)


def px_logits(cfg, params, tokens):
    return np.asarray(_jit(params, jnp.asarray(tokens, jnp.int32), cfg))


def rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b))) / max(1.0, float(np.max(np.abs(b))))


def tokens_for(seed=1):
    return np.random.default_rng(seed).integers(0, V, size=(B, T)).astype(np.int64)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_parity_both_ways(family, tmp_path):
    model = make_hf(family)
    tokens = tokens_for()
    ref = hf_logits(model, tokens)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)

    cfg, params = load_hf(tmp_path / "hf")
    assert rel_err(px_logits(cfg, params, tokens), ref) <= TOL, family
    assert cfg.n_params == sum(p.numel() for p in model.parameters()) == sum(x.size for x in jax.tree.leaves(params))

    option, off = FAMILIES[family][3], FAMILIES[family][4]
    assert getattr(cfg, option) != off
    assert_option_matters(family, cfg, params, tokens, ref, option, off)
    assert_exported_equal(family, FAMILIES[family][1], cfg, params, model, tokens, ref, tmp_path)


def assert_option_matters(family, cfg, params, tokens, ref, option, off):
    """The sensitivity control: the family's option switched off moves the logits far past the tolerance."""
    err_off = rel_err(px_logits(dataclasses.replace(cfg, **{option: off}), params, tokens), ref)
    assert err_off > 100 * TOL, f"{family}: {option} did not matter (err {err_off:.3g})"


def assert_exported_equal(family, model_cls, cfg, params, model, tokens, ref, tmp_path):
    """polychip -> save_hf -> transformers' from_pretrained: every tensor bit-exact, logits within TOL."""
    save_hf(tmp_path / "px", cfg, params, dtype="float32")
    back = getattr(transformers, model_cls).from_pretrained(
        tmp_path / "px", attn_implementation="eager", dtype=torch.float32).eval()
    want, got = model.state_dict(), back.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), f"{family}: {k} changed in the polychip -> HF round trip"
    assert rel_err(hf_logits(back, tokens), ref) <= TOL


def test_gemma_options_are_each_needed(tmp_path):
    """Gemma differs from Llama in three places; parity must fail with any one of them missing."""
    model = make_hf("gemma", seed=2)
    tokens = tokens_for(3)
    ref = hf_logits(model, tokens)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    cfg, params = load_hf(tmp_path / "hf")
    assert (cfg.norm_offset, cfg.embed_scale, cfg.mlp_act, cfg.tie_embeddings) == (1.0, True, "gelu_tanh", True)
    for option, off in (("embed_scale", False), ("mlp_act", "silu")):
        err = rel_err(px_logits(dataclasses.replace(cfg, **{option: off}), params, tokens), ref)
        assert err > 100 * TOL, f"gemma: {option} did not matter (err {err:.3g})"


def test_sliding_window_decode_matches_full_forward():
    """Decoding token by token against the contiguous cache applies the window the same way as the
    full forward (positions beyond the window must be masked in the cache too)."""
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64,
                      sliding_window=WINDOW, qkv_bias=True)
    params = init_params(cfg, jax.random.key(0))
    params["layers"]["bk"] = 0.5 * jax.random.normal(jax.random.key(1), params["layers"]["bk"].shape)
    rt = Runtime(KernelPolicy.create())
    toks = jnp.asarray(tokens_for(5)[:1, :16], jnp.int32)
    full = logits(params, toks, cfg, rt)[0]
    cache = init_cache(cfg, 1, 32)
    lg, cache = logits(params, toks[:, :4], cfg, rt, cache=cache, cache_pos=jnp.int32(0))
    steps = [lg]
    for t in range(4, 16):
        lg, cache = logits(params, toks[:, t:t + 1], cfg, rt, cache=cache, cache_pos=jnp.int32(t))
        steps.append(lg)
    assert rel_err(np.asarray(jnp.concatenate(steps, axis=1)), np.asarray(full)) <= TOL
    unwindowed = logits(params, toks, dataclasses.replace(cfg, sliding_window=0), rt)[0]
    assert rel_err(np.asarray(unwindowed), np.asarray(full)) > 100 * TOL


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma"])
def test_family_config_round_trip(family):
    conf = getattr(transformers, FAMILIES[family][0])(**COMMON, **FAMILIES[family][2])
    cfg = config_from_hf(conf.to_dict())
    d = config_to_hf(cfg)
    assert d["model_type"] == family and d["architectures"] == [FAMILIES[family][1]]
    assert config_from_hf(d) == cfg
    assert config_from_hf(getattr(transformers, FAMILIES[family][0])(**d).to_dict()) == cfg


@pytest.mark.parametrize("hf, msg", [
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1), "some layers only"),
    (dict(model_type="gemma", hidden_act="silu"), "Gemma hidden_act 'silu'"),
    (dict(model_type="gemma2"), "model_type 'gemma2' is not supported"),
    (dict(model_type="mistral", attention_bias=True), "attention_bias"),
])
def test_family_config_errors(hf, msg):
    with pytest.raises(HFError, match=msg):
        config_from_hf({**COMMON, **hf})


@pytest.mark.parametrize("change, msg", [
    (dict(attn_softcap=30.0), "soft-capped"),
    (dict(norm_offset=1.0), "only all-Llama"),
    (dict(norm_offset=1.0, embed_scale=True, mlp_act="gelu_tanh", tie_embeddings=True, qkv_bias=True), "Gemma-style"),
])
def test_export_refuses_models_no_family_expresses(change, msg, tmp_path):
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=4, d_ff=48, **change)
    with pytest.raises(HFError, match=msg):
        save_hf(tmp_path / "x", cfg, init_params(cfg, jax.random.key(0)), dtype="float32")
    assert not (tmp_path / "x").exists()

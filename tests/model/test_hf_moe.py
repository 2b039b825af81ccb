"""Mixtral and Qwen2-MoE through polychip's MoE block: logit parity with transformers'
MixtralForCausalLM / Qwen2MoeForCausalLM on tiny random configs, both directions (HF save_pretrained
-> load_hf -> polychip, and polychip -> save_hf -> from_pretrained, tensors bit-exact in float32).

Tolerance as in test_hf_families.py. Each family has a sensitivity control: an option of its routing
switched off must move the logits by far more than the tolerance."""
from __future__ import annotations

import dataclasses

import jax
import pytest

from polychip.config import MODEL_PRESETS
from polychip.model.hf import HFError, config_from_hf, config_to_hf, iter_hf_names, load_hf
from tests.model.test_hf_families import (COMMON, TOL, assert_exported_equal, assert_option_matters, hf_logits,
                                          px_logits, rel_err, tokens_for)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# name -> (config class, model class, extra config, option that must matter, its "off" value)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None), "experts_per_token", 1),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=48,
                       norm_topk_prob=False, tie_word_embeddings=False), "shared_expert_gate", False),
}


def make_hf(family: str, seed: int = 0):
    conf_cls, model_cls, extra, _, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, conf_cls)(**COMMON, **extra))
    model.config._attn_implementation = "eager"
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias") or name.endswith("gate.weight"):
                # Biases start at 0 and Qwen2-MoE's router at 0 (ties every expert): randomise them.
                p.copy_(0.5 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_moe_family_parity_both_ways(family, tmp_path):
    model = make_hf(family)
    tokens = tokens_for()
    ref = hf_logits(model, tokens)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)

    cfg, params = load_hf(tmp_path / "hf")
    assert cfg.n_experts == 4 and cfg.experts_per_token == 2
    assert rel_err(px_logits(cfg, params, tokens), ref) <= TOL, family
    assert cfg.n_params == sum(p.numel() for p in model.parameters()) == sum(x.size for x in jax.tree.leaves(params))

    assert_option_matters(family, cfg, params, tokens, ref, FAMILIES[family][3], FAMILIES[family][4])
    assert_exported_equal(family, FAMILIES[family][1], cfg, params, model, tokens, ref, tmp_path)


def test_qwen2_moe_unnormalised_gates_matter(tmp_path):
    model = make_hf("qwen2_moe", seed=3)
    tokens = tokens_for(2)
    ref = hf_logits(model, tokens)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    cfg, params = load_hf(tmp_path / "hf")
    assert not cfg.router_norm_topk and cfg.n_shared_experts == 2
    assert rel_err(px_logits(dataclasses.replace(cfg, router_norm_topk=True), params, tokens), ref) > 100 * TOL


def test_presets_export_names():
    mix = MODEL_PRESETS["mixtral-8x7b"]
    hf = config_to_hf(mix)
    assert hf["model_type"] == "mixtral" and hf["intermediate_size"] == 14336 and hf["num_local_experts"] == 8
    assert config_from_hf(hf) == dataclasses.replace(mix, max_seq_len=hf["max_position_embeddings"])
    names = list(iter_hf_names(dataclasses.replace(mix, n_layers=1)))
    assert "model.layers.0.block_sparse_moe.experts.7.w2.weight" in names and len(names) == 1 + 6 + 1 + 3 * 8 + 2


@pytest.mark.parametrize("cfg,msg", [
    (MODEL_PRESETS["deepseek-v3"], "sigmoid"),
    (MODEL_PRESETS["moe-tiny"], "Mixtral"),  # shared experts without q/k/v biases
])
def test_inexpressible_moe_is_refused(cfg, msg):
    with pytest.raises(HFError, match=msg):
        config_to_hf(cfg)


def test_qwen2_moe_with_dense_layers_is_refused():
    hf = config_to_hf(dataclasses.replace(MODEL_PRESETS["moe-tiny"], qkv_bias=True, shared_expert_gate=True))
    with pytest.raises(HFError, match="decoder_sparse_step"):
        config_from_hf({**hf, "decoder_sparse_step": 2})

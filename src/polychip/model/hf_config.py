"""Hugging Face config.json <-> ModelConfig for the families polychip's one block covers.

| model_type | HF class            | what differs from Llama (as ModelConfig options)                   |
|------------|---------------------|--------------------------------------------------------------------|
| llama      | LlamaForCausalLM    | -                                                                  |
| mistral    | MistralForCausalLM  | sliding_window (null: none)                                        |
| qwen2      | Qwen2ForCausalLM    | qkv_bias=True; sliding window only when every layer slides         |
| gemma      | GemmaForCausalLM    | norm_offset=1, embed_scale, mlp_act="gelu_tanh", tied embeddings   |
| mixtral    | MixtralForCausalLM  | as mistral, MoE: n_experts, top-k softmax gates renormalised       |
| qwen2_moe  | Qwen2MoeForCausalLM | as qwen2, MoE: shared experts behind a sigmoid gate, norm_topk_prob |

Gemma 2 is refused: it adds post-attention/post-MLP norms and alternates windowed and global layers,
which the stacked single block does not express (soft-capping, its other change, is available as
ModelConfig options). Export picks the family from the options (hf_family).
"""
from __future__ import annotations

from typing import Any

from polychip.config import ConfigError, ModelConfig, RopeScaling


class HFError(ConfigError):
    """A Hugging Face checkpoint that cannot be read or mapped (a ValueError; the CLI prints one line)."""


ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "gemma": "GemmaForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu")  # Gemma's legacy "gelu" means the tanh form


def _rope_dict(hf: dict) -> dict | None:
    """The RoPE parameter dict, from `rope_parameters` (transformers >= 5) or `rope_scaling` (4.x)."""
    for key in ("rope_parameters", "rope_scaling"):
        rd = hf.get(key)
        if rd:
            if not isinstance(rd, dict):
                raise HFError(f"config.json: {key} must be an object, got {rd!r}")
            return rd
    return None


def _rope(hf: dict, max_pos: int) -> tuple[float, RopeScaling | None]:
    rd = _rope_dict(hf) or {}
    rope_type = rd.get("rope_type", rd.get("type", "default"))
    # transformers 5 keeps rope_theta inside rope_parameters; 4.x at the top level. HF's default is 1e4.
    theta = float(rd.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if rd.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) not in (1, 1.0, None):
        raise HFError("config.json: partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise HFError(f"config.json: rope_type {rope_type!r} is not supported (only 'default' and 'llama3')")
    try:
        return theta, RopeScaling(
            factor=float(rd["factor"]),
            low_freq_factor=float(rd["low_freq_factor"]),
            high_freq_factor=float(rd["high_freq_factor"]),
            # HF falls back to max_position_embeddings when this is absent.
            original_max_position_embeddings=int(rd.get("original_max_position_embeddings", max_pos)),
        )
    except KeyError as e:
        raise HFError(f"config.json: llama3 rope scaling is missing {e.args[0]!r}") from None


def _qwen2_window(hf: dict) -> int:
    """Qwen2 slides only on layers >= max_window_layers, and only with use_sliding_window."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    n = int(hf["num_hidden_layers"])
    types = hf.get("layer_types") or [
        "sliding_attention" if window is not None and i >= int(hf.get("max_window_layers", 28)) else "full_attention"
        for i in range(n)]
    if all(t == "full_attention" for t in types):
        return 0
    if window is not None and all(t == "sliding_attention" for t in types):
        return int(window)
    raise HFError("config.json: Qwen2 with sliding windows on some layers only is not supported")


def _family_options(model_type: str, hf: dict) -> dict[str, Any]:
    """The ModelConfig options a family sets, after refusing what the block cannot express."""
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if model_type == "gemma":
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in _GELU_TANH:
            raise HFError(f"config.json: Gemma hidden_act {act!r} is not supported (only gelu_pytorch_tanh)")
        if hf.get("attention_bias"):
            raise HFError("config.json: attention_bias=true is not supported for Gemma")
        return dict(norm_offset=1.0, embed_scale=True, mlp_act="gelu_tanh", tie_embeddings=True)
    if act != "silu":
        raise HFError(f"config.json: hidden_act {act!r} is not supported for {model_type} (only 'silu')")
    if hf.get("mlp_bias"):
        raise HFError("config.json: mlp_bias=true is not supported")
    if model_type == "qwen2":
        return dict(qkv_bias=True, sliding_window=_qwen2_window(hf))
    if model_type == "qwen2_moe":
        return dict(qkv_bias=bool(hf.get("qkv_bias", True)), sliding_window=_qwen2_window(hf), **_qwen2_moe(hf))
    if hf.get("attention_bias"):
        raise HFError("config.json: attention_bias=true is not supported (polychip's block has q/k/v biases "
                      "only for Qwen2, and no output-projection bias)")
    if model_type in ("mistral", "mixtral"):
        opts = dict(sliding_window=int(hf.get("sliding_window") or 0))
        if model_type == "mixtral":
            opts.update(n_experts=int(hf.get("num_local_experts", 8)), experts_per_token=int(hf.get("num_experts_per_tok", 2)),
                        router_aux_loss=float(hf.get("router_aux_loss_coef", 0.02)))
        return opts
    return {}


def _qwen2_moe(hf: dict) -> dict[str, Any]:
    """Qwen2-MoE's expert options; refuses dense layers between sparse ones (one stacked block)."""
    if int(hf.get("decoder_sparse_step", 1)) != 1 or hf.get("mlp_only_layers"):
        raise HFError("config.json: Qwen2-MoE with dense layers (decoder_sparse_step != 1 or mlp_only_layers) "
                      "is not supported")
    F, S = int(hf.get("moe_intermediate_size", 1408)), int(hf.get("shared_expert_intermediate_size", 0))
    if S % F:
        raise HFError(f"config.json: shared_expert_intermediate_size={S} is not a multiple of "
                      f"moe_intermediate_size={F}")
    return dict(n_experts=int(hf.get("num_experts", 60)), experts_per_token=int(hf.get("num_experts_per_tok", 4)),
                expert_d_ff=F, n_shared_experts=S // F, shared_expert_gate=S > 0,
                router_norm_topk=bool(hf.get("norm_topk_prob", False)),
                router_aux_loss=float(hf.get("router_aux_loss_coef", 0.001)))


def config_from_hf(hf: dict) -> ModelConfig:
    """A config.json (as a dict) of a supported family -> ModelConfig. Anything else raises HFError."""
    model_type = hf.get("model_type", "llama")
    if model_type not in ARCHITECTURES:
        raise HFError(f"config.json: model_type {model_type!r} is not supported "
                      f"(supported: {', '.join(ARCHITECTURES)})")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size") if hf.get(k) is None]
    if missing:
        raise HFError(f"config.json: missing required field(s) {', '.join(missing)}")
    options = {"tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
               **_family_options(model_type, hf)}
    max_pos = int(hf.get("max_position_embeddings", 2048))
    theta, scaling = _rope(hf, max_pos)
    n_heads = int(hf["num_attention_heads"])
    try:
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            d_model=int(hf["hidden_size"]),
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            head_dim=int(hf.get("head_dim") or 0),
            d_ff=int(hf["intermediate_size"]),
            max_seq_len=max_pos,
            rope_theta=theta,
            rope_scaling=scaling,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            init_std=float(hf.get("initializer_range", 0.02)),
            **options,
        )
    except ConfigError as e:
        raise HFError(f"config.json describes an invalid model: {e}") from None


def hf_family(cfg: ModelConfig) -> str:
    """The HF model_type that expresses cfg's options (HFError when none does)."""
    if cfg.attn_softcap or cfg.final_softcap:
        raise HFError("soft-capped models have no Hugging Face export here (Gemma 2 is not supported)")
    gemma = (cfg.norm_offset, cfg.embed_scale, cfg.mlp_act)
    if gemma == (1.0, True, "gelu_tanh"):
        if cfg.qkv_bias or cfg.sliding_window or not cfg.tie_embeddings:
            raise HFError("a Gemma-style model with q/k/v biases, a sliding window or untied embeddings "
                          "has no Hugging Face family")
        return "gemma"
    if gemma != (0.0, False, "silu"):
        raise HFError(f"norm_offset={cfg.norm_offset}, embed_scale={cfg.embed_scale}, mlp_act={cfg.mlp_act!r}: "
                      "only all-Llama (0, False, 'silu') or all-Gemma (1, True, 'gelu_tanh') map to an HF family")
    if cfg.n_experts:
        return _moe_family(cfg)
    if cfg.qkv_bias:
        return "qwen2"
    return "mistral" if cfg.sliding_window else "llama"


def _moe_family(cfg: ModelConfig) -> str:
    if cfg.router_gate != "softmax":
        raise HFError("sigmoid-gated MoE models have no Hugging Face export here (Mixtral and Qwen2-MoE use softmax)")
    if cfg.qkv_bias:
        if not (cfg.n_shared_experts and cfg.shared_expert_gate):
            raise HFError("a MoE model with q/k/v biases exports as Qwen2-MoE, which needs gated shared experts")
        return "qwen2_moe"
    if cfg.n_shared_experts or not cfg.router_norm_topk:
        raise HFError("a MoE model without q/k/v biases exports as Mixtral: no shared experts, renormalised gates")
    return "mixtral"


def _family_fields(cfg: ModelConfig, family: str) -> dict[str, Any]:
    if family == "gemma":
        return {"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False}
    out: dict[str, Any] = {"hidden_act": "silu"}
    if family == "qwen2":
        window = cfg.sliding_window or None
        return {**out, "use_sliding_window": window is not None, "sliding_window": window,
                "max_window_layers": 0 if window else cfg.n_layers}
    if family == "mistral":
        return {**out, "sliding_window": cfg.sliding_window}
    if family == "mixtral":
        return {**out, "sliding_window": cfg.sliding_window or None, "num_local_experts": cfg.n_experts,
                "num_experts_per_tok": cfg.experts_per_token, "intermediate_size": cfg.expert_d_ff,
                "router_aux_loss_coef": cfg.router_aux_loss, "output_router_logits": False}
    if family == "qwen2_moe":
        window = cfg.sliding_window or None
        return {**out, "use_sliding_window": window is not None, "sliding_window": window,
                "max_window_layers": 0 if window else cfg.n_layers, "qkv_bias": True, "num_experts": cfg.n_experts,
                "num_experts_per_tok": cfg.experts_per_token, "moe_intermediate_size": cfg.expert_d_ff,
                "shared_expert_intermediate_size": cfg.n_shared_experts * cfg.expert_d_ff,
                "norm_topk_prob": cfg.router_norm_topk, "decoder_sparse_step": 1, "mlp_only_layers": [],
                "router_aux_loss_coef": cfg.router_aux_loss, "output_router_logits": False}
    return {**out, "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}


def config_to_hf(cfg: ModelConfig, dtype: str = "bfloat16", **extra: Any) -> dict:
    """ModelConfig -> a config.json dict of its family (hf_family), readable by transformers 4.x and 5.x.

    RoPE is written both ways: `rope_theta` + `rope_scaling` (4.x) and `rope_parameters` (5.x).
    `extra` (e.g. bos_token_id, eos_token_id) is merged in last."""
    family = hf_family(cfg)
    rope_params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    scaling = None
    if cfg.rope_scaling is not None:
        sc = cfg.rope_scaling
        scaling = {"rope_type": "llama3", "factor": float(sc.factor), "low_freq_factor": float(sc.low_freq_factor),
                   "high_freq_factor": float(sc.high_freq_factor),
                   "original_max_position_embeddings": int(sc.original_max_position_embeddings)}
        rope_params = {**scaling, "rope_theta": float(cfg.rope_theta)}
    out = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": float(cfg.rope_theta),
        "rope_scaling": scaling,
        "rope_parameters": rope_params,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": dtype,  # transformers 4.x
        "dtype": dtype,        # transformers 5.x
        **_family_fields(cfg, family),
    }
    out.update(extra)
    return out

"""Parity of polychip's Llama with Hugging Face transformers' LlamaForCausalLM (an implementation
nobody here wrote), through polychip.model.hf's checkpoint import/export.

Tolerances: logits are compared as max|a - b| <= tol * max(1, max|b|).
  float32, same weights on both sides: tol = 1e-4 (float32 eps is 1.2e-7; measured differences on
  these 2-layer models are ~1e-6 absolute at logits of ~2, so 1e-4 leaves margin yet catches any
  mapping mistake, which moves logits by O(0.1): see the sensitivity control below).
  bf16-rounded weights vs the float32 original: tol = 8 * 2**-8 (bf16 keeps 8 significant bits, so each
  weight moves by up to 2**-9 relative and ~10 matmuls accumulate it; measured ~1e-2 at scale ~2.5,
  i.e. about a quarter of the tolerance).
"""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from polychip.config import ModelConfig, RopeScaling, preset
from polychip.kernels.registry import KernelPolicy
from polychip.model import hf
from polychip.model.hf import HFError, config_from_hf, config_to_hf, load_hf, save_hf
from polychip.model.rope import inv_frequencies
from polychip.model.transformer import Runtime, init_params, logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL_F32 = 1e-4
TOL_BF16 = 8 * 2.0**-8
B, T = 2, 24

# name -> (n_kv_heads, tie_word_embeddings, llama3 rope scaling)
CASES = {
    "mha-untied": (4, False, None),
    "gqa-tied": (2, True, None),
    "mqa-untied": (1, False, None),
    "mqa-tied": (1, True, None),
    # original_max_position_embeddings=32, head_dim=16, theta=1e4: wavelengths 6.3 (< 8: kept),
    # 19.9 (between 8 and 32: smoothed), 62.8+ (> 32: divided by factor) -- every llama3 branch.
    "gqa-untied-llama3": (2, False, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
}


def hf_config(n_kv: int, tie: bool, rope_scaling: dict | None):
    # head_dim * n_heads (64) != hidden_size (32), so a reshape that assumes D == H * Dh fails.
    kw = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=n_kv, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=tie, initializer_range=0.1)
    if rope_scaling is not None:
        kw["rope_scaling"] = dict(rope_scaling)
    return transformers.LlamaConfig(**kw)


def make_hf_model(case: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_config(*CASES[case]))
    model.config._attn_implementation = "eager"
    model.eval()
    with torch.no_grad():
        # HF initialises RMSNorm weights to 1; randomise them so the norm mapping is tested too.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model


def from_pretrained(path, dtype=torch.float32):
    return transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=dtype).eval()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.float().numpy()


_logits_jit = jax.jit(lambda p, t, cfg: logits(p, t, cfg, Runtime(KernelPolicy.create()))[0], static_argnums=2)


def px_logits(cfg: ModelConfig, params: dict, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(_logits_jit(params, jnp.asarray(tokens, jnp.int32), cfg))


def max_err(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max abs difference, scale) with scale = max(1, max|b|)."""
    return float(np.max(np.abs(a - b))), max(1.0, float(np.max(np.abs(b))))


def assert_close(a, b, tol, what):
    assert a.shape == b.shape, f"{what}: shapes {a.shape} vs {b.shape}"
    err, scale = max_err(a, b)
    assert err <= tol * scale, f"{what}: max|diff|={err:.3g} > {tol:.3g} * {scale:.3g}"


def tokens_for(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 97, size=(B, T)).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Parity with transformers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_parity_load_and_save_float32(case, tmp_path):
    model = make_hf_model(case)
    tokens = tokens_for()
    ref = hf_logits(model, tokens)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)

    cfg, params = load_hf(tmp_path / "hf")
    n_kv, tie, scaling = CASES[case]
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.tie_embeddings) == (4, n_kv, 16, tie)
    assert (cfg.rope_scaling is not None) == (scaling is not None)
    assert ("lm_head" in params) == (not tie)
    assert params["layers"]["wq"].dtype == np.float32
    out = px_logits(cfg, params, tokens)
    assert_close(out, ref, TOL_F32, f"{case}: polychip(load_hf) vs transformers")

    if case == "mha-untied":
        # Sensitivity control: swapping two same-shaped tensors must break parity, so the tolerance is
        # tight enough to catch a mapping mistake.
        bad = dict(params)
        bad["layers"] = dict(params["layers"], attn_norm=params["layers"]["mlp_norm"],
                             mlp_norm=params["layers"]["attn_norm"])
        err, scale = max_err(px_logits(cfg, bad, tokens), ref)
        assert err > 100 * TOL_F32 * scale

    save_hf(tmp_path / "px", cfg, params, dtype="float32")
    back = from_pretrained(tmp_path / "px")
    # float32 out and back must be bit-exact, weight by weight.
    want = model.state_dict()
    got = back.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), f"{case}: {k} changed in the polychip -> HF round trip"
    assert_close(hf_logits(back, tokens), ref, TOL_F32, f"{case}: transformers(save_hf) vs transformers")


def test_parity_bfloat16(tmp_path):
    case = "gqa-untied-llama3"
    model = make_hf_model(case, seed=3)
    tokens = tokens_for(4)
    ref32 = hf_logits(model, tokens)

    # HF bf16 checkpoint -> polychip (float32 and bfloat16 params).
    model16 = make_hf_model(case, seed=3).to(torch.bfloat16)
    model16.save_pretrained(tmp_path / "hf16", safe_serialization=True)
    header = load_file(tmp_path / "hf16" / "model.safetensors")
    assert header["model.norm.weight"].dtype == ml_dtypes.bfloat16
    # The same bf16-rounded weights computed in float32. (Not model16.float(): .to(bfloat16) also
    # rounds the rotary inv_freq buffer, which a fresh load recomputes in float32.)
    ref_rounded = hf_logits(from_pretrained(tmp_path / "hf16", dtype=torch.float32), tokens)

    cfg, p32 = load_hf(tmp_path / "hf16", dtype="float32")
    assert_close(px_logits(cfg, p32, tokens), ref_rounded, TOL_F32, "bf16 checkpoint loaded as float32")
    assert_close(px_logits(cfg, p32, tokens), ref32, TOL_BF16, "bf16 checkpoint vs float32 original")
    _, p16 = load_hf(tmp_path / "hf16", dtype="bfloat16")
    assert p16["layers"]["w_up"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(p16["layers"]["w_up"].astype(np.float32), p32["layers"]["w_up"])

    # polychip float32 params -> bf16 checkpoint -> transformers: rounding must match torch's own.
    model.save_pretrained(tmp_path / "hf32", safe_serialization=True)
    cfg, params = load_hf(tmp_path / "hf32")
    save_hf(tmp_path / "px16", cfg, params, dtype="bfloat16")
    assert json.loads((tmp_path / "px16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = from_pretrained(tmp_path / "px16", dtype=torch.bfloat16)
    want = model.to(torch.bfloat16).state_dict()
    for k, v in back.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, want[k]), f"{k}: bf16 rounding differs from torch's"
    assert_close(hf_logits(back.float(), tokens), ref32, TOL_BF16, "save_hf(bf16) vs float32 original")


def test_sharded_both_ways(tmp_path):
    model = make_hf_model("gqa-tied", seed=5)
    tokens = tokens_for(6)
    ref = hf_logits(model, tokens)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    cfg, params = load_hf(tmp_path / "hf")
    assert_close(px_logits(cfg, params, tokens), ref, TOL_F32, "sharded HF checkpoint")

    save_hf(tmp_path / "px", cfg, params, dtype="float32", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "px" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / "px" / s).is_file() for s in shards)
    assert_close(hf_logits(from_pretrained(tmp_path / "px"), tokens), ref, TOL_F32, "sharded save_hf")

    # Overwriting the folder with a single-file save removes the old shards and index, and leaves
    # files that are not ours alone (an adapter beside model.safetensors is not read as weights).
    save_file({"lora_A": np.zeros((2, 2), np.float32)}, tmp_path / "px" / "adapter_model.safetensors")
    (tmp_path / "px" / "README.md").write_text("mine")
    save_hf(tmp_path / "px", cfg, params, dtype="float32")
    names = sorted(p.name for p in (tmp_path / "px").iterdir())
    assert names == ["README.md", "adapter_model.safetensors", "config.json", "generation_config.json",
                     "model.safetensors"]
    assert load_hf(tmp_path / "px")[0] == cfg
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".px.tmp")]
    assert_close(hf_logits(from_pretrained(tmp_path / "px"), tokens), ref, TOL_F32, "overwritten save_hf")


# ----------------------------------------------------------------------------------------------
# Config and RoPE
# ----------------------------------------------------------------------------------------------
# Meta-Llama-3.1-8B's config.json as published (transformers 4.x format: rope_scaling + rope_theta).
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}


def same_model(a: ModelConfig, b: ModelConfig) -> bool:
    # multiple_of only derives d_ff, which HF stores explicitly.
    return dataclasses.replace(a, multiple_of=b.multiple_of) == b


@pytest.mark.parametrize("name", ["tiny", "125m", "1b", "llama3-8b"])
def test_config_round_trip(name):
    cfg = preset(name).model
    d = config_to_hf(cfg)
    assert d["architectures"] == ["LlamaForCausalLM"] and d["model_type"] == "llama"
    assert same_model(config_from_hf(json.loads(json.dumps(d))), cfg)
    # transformers parses our dict into the same model, in its own (5.x, rope_parameters) format.
    hc = transformers.LlamaConfig(**d)
    assert same_model(config_from_hf(hc.to_dict()), cfg)


def test_config_from_published_llama31():
    cfg = config_from_hf(LLAMA31_8B)
    assert cfg == dataclasses.replace(preset("llama3-8b").model, max_seq_len=131072)
    # The same RoPE given the transformers-5 way, nested under rope_parameters with rope_theta inside.
    new = {k: v for k, v in LLAMA31_8B.items() if k not in ("rope_scaling", "rope_theta")}
    new["rope_parameters"] = dict(LLAMA31_8B["rope_scaling"], rope_theta=500000.0)
    assert config_from_hf(new) == cfg
    # original_max_position_embeddings absent: HF falls back to max_position_embeddings.
    rs = {k: v for k, v in LLAMA31_8B["rope_scaling"].items() if k != "original_max_position_embeddings"}
    assert config_from_hf(dict(LLAMA31_8B, rope_scaling=rs)).rope_scaling.original_max_position_embeddings == 131072


@pytest.mark.parametrize("bad, msg", [
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "gemma2"}, "model_type 'gemma2'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"hidden_size": None}, "hidden_size"),
    ({"num_key_value_heads": 5}, "n_kv_heads"),
])
def test_config_errors(bad, msg):
    with pytest.raises(HFError, match=msg):
        config_from_hf(dict(LLAMA31_8B, **bad))


@pytest.mark.parametrize("name", ["tiny", "1b", "llama3-8b"])
def test_inv_frequencies_match_transformers(name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = preset(name).model
    hc = transformers.LlamaConfig(**config_to_hf(cfg))
    ours = inv_frequencies(cfg)
    theirs = LlamaRotaryEmbedding(hc).inv_freq.numpy()
    if cfg.rope_scaling is not None:
        direct = ROPE_INIT_FUNCTIONS["llama3"](hc)[0].numpy()
        np.testing.assert_array_equal(direct, theirs)
        # Scaling actually changed something (else this would compare plain RoPE only).
        assert not np.allclose(ours, inv_frequencies(dataclasses.replace(cfg, rope_scaling=None)))
    assert ours.shape == theirs.shape == (cfg.head_dim // 2,)
    # HF computes in float32, polychip in float64 then rounds: a few ulp apart at most.
    np.testing.assert_allclose(ours, theirs, rtol=2e-6, atol=0)


# ----------------------------------------------------------------------------------------------
# Errors, tokenizer, raw reader (no torch needed)
# ----------------------------------------------------------------------------------------------
SMALL = ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24, max_seq_len=32,
                    rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=16))


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("small") / "ckpt"
    params = init_params(SMALL, jax.random.key(0))
    save_hf(path, SMALL, params, dtype="float32", bos_token_id=1, eos_token_id=2)
    return path, params


def _edit_weights(path, fn):
    f = path / "model.safetensors"
    tensors = dict(load_file(f))
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_small_round_trip_exact(small_ckpt, tmp_path):
    path, params = small_ckpt
    cfg, loaded = load_hf(path)
    assert cfg == SMALL
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, loaded)
    gen = json.loads((path / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    assert sorted(load_file(path / "model.safetensors")) == sorted(hf.iter_hf_names(SMALL))


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor(small_ckpt, tmp_path):
    path = _copy(small_ckpt[0], tmp_path / "m")
    _edit_weights(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(HFError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is missing \(expected shape \[24, 16\]\)"):
        load_hf(path)


def test_wrong_shape(small_ckpt, tmp_path):
    path = _copy(small_ckpt[0], tmp_path / "m")

    def transpose(t):
        t["model.layers.0.self_attn.k_proj.weight"] = np.ascontiguousarray(t["model.layers.0.self_attn.k_proj.weight"].T)
    _edit_weights(path, transpose)
    with pytest.raises(HFError, match=r"k_proj\.weight has shape \[16, 8\], expected \[8, 16\]"):
        load_hf(path)


def test_unexpected_tensor(small_ckpt, tmp_path):
    path = _copy(small_ckpt[0], tmp_path / "m")
    _edit_weights(path, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(16, np.float32),
                                            "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(2, np.float32)}))
    with pytest.raises(HFError, match=r"unexpected tensors.*q_proj\.bias$"):
        load_hf(path)


def test_missing_config_and_weights(small_ckpt, tmp_path):
    path = _copy(small_ckpt[0], tmp_path / "m")
    (path / "config.json").unlink()
    with pytest.raises(HFError, match="config.json"):
        load_hf(path)
    with pytest.raises(HFError, match="not a directory"):
        load_hf(tmp_path / "nowhere")
    path = _copy(small_ckpt[0], tmp_path / "n")
    (path / "model.safetensors").unlink()
    with pytest.raises(HFError, match="no \\*.safetensors"):
        load_hf(path)


def test_save_rejects_wrong_params(tmp_path):
    params = init_params(SMALL, jax.random.key(0))
    params["layers"] = dict(params["layers"], wq=jnp.zeros((2, 16, 4, 2)))
    with pytest.raises(HFError, match=r"layers\.wq has shape \[2, 16, 4, 2\], expected \[2, 16, 4, 4\]"):
        save_hf(tmp_path / "x", SMALL, params)
    assert not (tmp_path / "x").exists()


def test_tokenizer_copy(small_ckpt, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    assert hf.copy_tokenizer(src, tmp_path / "dst") == [tmp_path / "dst" / "tokenizer.json"]
    assert (tmp_path / "dst" / "tokenizer.json").read_text() == '{"model": {"type": "BPE"}}'
    assert hf.copy_tokenizer(tmp_path / "dst2", tmp_path / "dst3") == []  # nothing there, nothing copied
    params = init_params(SMALL, jax.random.key(1))
    save_hf(tmp_path / "withtok", SMALL, params, tokenizer_path=src)
    assert (tmp_path / "withtok" / "tokenizer.json").read_text() == '{"model": {"type": "BPE"}}'
    with pytest.raises(HFError, match="tokenizer"):
        save_hf(tmp_path / "badtok", SMALL, params, tokenizer_path=tmp_path / "missing.json")
    assert not (tmp_path / "badtok").exists()


def test_raw_reader_matches_safetensors(tmp_path):
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(ml_dtypes.bfloat16)
    y = np.arange(4, dtype=np.float32)
    save_file({"x": x, "y": y}, tmp_path / "a.safetensors")
    np.testing.assert_array_equal(hf.read_safetensors_raw(tmp_path / "a.safetensors", "x"), x)
    np.testing.assert_array_equal(hf.read_safetensors_raw(tmp_path / "a.safetensors", "y"), y)
    assert hf.read_safetensors_raw(tmp_path / "a.safetensors", "x").dtype == ml_dtypes.bfloat16

"""Hugging Face checkpoint import/export (config.json + *.safetensors), without torch, for the Llama,
Mistral, Qwen2 and Gemma families (config mapping: hf_config.py; all four share these tensor names)
and the mixture-of-experts families Mixtral and Qwen2-MoE (MOE_TENSORS below).

Name and layout mapping (HF `LlamaForCausalLM` -> polychip params, see model/transformer.py):

  model.embed_tokens.weight                 [V, D]      -> embed        [V, D]
  model.layers.{i}.input_layernorm.weight   [D]         -> attn_norm    [L, D]      (stacked over i)
  model.layers.{i}.self_attn.q_proj.weight  [H*Dh, D]   -> wq           [L, D, H, Dh]
  model.layers.{i}.self_attn.k_proj.weight  [K*Dh, D]   -> wk           [L, D, K, Dh]
  model.layers.{i}.self_attn.v_proj.weight  [K*Dh, D]   -> wv           [L, D, K, Dh]
  model.layers.{i}.self_attn.o_proj.weight  [D, H*Dh]   -> wo           [L, H, Dh, D]
  model.layers.{i}.post_attention_layernorm [D]         -> mlp_norm     [L, D]
  model.layers.{i}.mlp.gate_proj.weight     [F, D]      -> w_gate       [L, D, F]
  model.layers.{i}.mlp.up_proj.weight       [F, D]      -> w_up         [L, D, F]
  model.layers.{i}.mlp.down_proj.weight     [D, F]      -> w_down       [L, F, D]
  model.norm.weight                         [D]         -> final_norm   [D]
  lm_head.weight                            [V, D]      -> lm_head      [D, V]  (absent when tied)
  model.layers.{i}.self_attn.q_proj.bias    [H*Dh]      -> bq           [L, H, Dh]  (Qwen2; k/v alike)

Mixture-of-experts layers replace the three mlp.* tensors with a router [E, D] -> moe_router [L, D, E]
and, per expert j, three [F, D] / [D, F] matrices stacked into moe_gate / moe_up [L, E, D, F] and
moe_down [L, E, F, D] (names in the per-expert "legacy" layout that published checkpoints use and
transformers 5 still writes with save_pretrained; it fuses them only in memory).

torch `nn.Linear` stores [out, in], polychip stores [in, out], hence the transposes. No q/k row
permutation is needed: HF checkpoints are already permuted for the rotate-half RoPE layout that
polychip/model/rope.py uses too.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import ml_dtypes
import numpy as np

from polychip.config import ModelConfig
from polychip.files import atomic_write
from polychip.model.hf_config import HFError, config_from_hf, config_to_hf, hf_family  # noqa: F401 (re-exported)

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# HF's default shard limit for save_pretrained is 5 GB (decimal).
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000

_NP_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
# Tensors HF checkpoints may carry that polychip recomputes instead of storing.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)

# (polychip key under params["layers"], HF name suffix under model.layers.{i}.)
LAYER_TENSORS: tuple[tuple[str, str], ...] = (
    ("attn_norm", "input_layernorm.weight"),
    ("wq", "self_attn.q_proj.weight"),
    ("wk", "self_attn.k_proj.weight"),
    ("wv", "self_attn.v_proj.weight"),
    ("wo", "self_attn.o_proj.weight"),
    ("mlp_norm", "post_attention_layernorm.weight"),
    ("w_gate", "mlp.gate_proj.weight"),
    ("w_up", "mlp.up_proj.weight"),
    ("w_down", "mlp.down_proj.weight"),
)
# Qwen2's q/k/v biases (ModelConfig.qkv_bias), [H*Dh] / [K*Dh] in HF -> [H, Dh] / [K, Dh].
BIAS_TENSORS: tuple[tuple[str, str], ...] = (
    ("bq", "self_attn.q_proj.bias"),
    ("bk", "self_attn.k_proj.bias"),
    ("bv", "self_attn.v_proj.bias"),
)


# MoE families: (polychip key, HF suffix; {j} is the expert index for per-expert tensors).
MOE_TENSORS: dict[str, tuple[tuple[str, str], ...]] = {
    "mixtral": (("moe_router", "block_sparse_moe.gate.weight"),
                ("moe_gate", "block_sparse_moe.experts.{j}.w1.weight"),
                ("moe_up", "block_sparse_moe.experts.{j}.w3.weight"),
                ("moe_down", "block_sparse_moe.experts.{j}.w2.weight")),
    "qwen2_moe": (("moe_router", "mlp.gate.weight"), ("moe_gate", "mlp.experts.{j}.gate_proj.weight"),
                  ("moe_up", "mlp.experts.{j}.up_proj.weight"), ("moe_down", "mlp.experts.{j}.down_proj.weight"),
                  ("shared_gate", "mlp.shared_expert.gate_proj.weight"),
                  ("shared_up", "mlp.shared_expert.up_proj.weight"),
                  ("shared_down", "mlp.shared_expert.down_proj.weight"),
                  ("shared_router", "mlp.shared_expert_gate.weight")),
}


def layer_tensors(cfg: ModelConfig) -> tuple[tuple[str, str], ...]:
    """(polychip key, HF suffix) of every per-layer tensor cfg's family has; per-expert suffixes hold {j}."""
    base = LAYER_TENSORS + (BIAS_TENSORS if cfg.qkv_bias else ())
    if not cfg.n_experts:
        return base
    return tuple(t for t in base if t[0] not in ("w_gate", "w_up", "w_down")) + MOE_TENSORS[hf_family(cfg)]


def layer_entries(cfg: ModelConfig) -> Iterator[tuple[str, str, tuple[int, ...]]]:
    """(polychip key, HF suffix, index inside one layer's array): () for a whole tensor, (j,) for expert j."""
    for key, suffix in layer_tensors(cfg):
        if "{j}" in suffix:
            for j in range(cfg.n_experts):
                yield key, suffix.format(j=j), (j,)
        else:
            yield key, suffix, ()


def np_dtype(dtype: Any) -> np.dtype:
    """"float32"/"bfloat16"/"float16", a numpy dtype or a jnp dtype -> numpy dtype (bf16 via ml_dtypes)."""
    if isinstance(dtype, str):
        if dtype not in _NP_DTYPES:
            raise HFError(f"unsupported dtype {dtype!r}; use one of {', '.join(_NP_DTYPES)}")
        return _NP_DTYPES[dtype]
    return np.dtype(dtype)


# ----------------------------------------------------------------------------------------------
# Config (the mapping itself lives in hf_config.py)
# ----------------------------------------------------------------------------------------------
def read_config(path: str | os.PathLike) -> dict:
    p = Path(path) / CONFIG_NAME
    if not p.is_file():
        raise HFError(f"{p}: not found (a Hugging Face model folder needs config.json)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise HFError(f"{p}: not valid JSON ({e})") from None


# ----------------------------------------------------------------------------------------------
# Safetensors reading
# ----------------------------------------------------------------------------------------------
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors_raw(file: str | os.PathLike, name: str) -> np.ndarray:
    """One tensor straight from the file format (8-byte header length, JSON header, raw little-endian
    data), with bf16 via ml_dtypes. Used when the installed safetensors' numpy backend cannot produce
    a dtype (older releases had no BF16 for numpy)."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        if name not in header:
            raise HFError(f"{file}: no tensor {name!r}")
        info = header[name]
        if info["dtype"] not in _ST_DTYPES:
            raise HFError(f"{file}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        f.seek(8 + n + start)
        buf = f.read(end - start)
    dt = np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<")
    return np.frombuffer(buf, dtype=dt).reshape(info["shape"])


class _Checkpoint:
    """Tensor name -> safetensors file for a model folder (single file, sharded with an index, or a
    bare set of *.safetensors files); reads one tensor at a time so peak memory is one tensor plus
    the output."""

    def __init__(self, path: Path):
        from safetensors import safe_open  # noqa: F401  (fail early with a clear message below)

        index = path / SAFE_INDEX_NAME
        self.files: dict[str, Path] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise HFError(f"{index}: not a valid safetensors index ({e})") from None
            for name, fname in weight_map.items():
                f = path / fname
                if not f.is_file():
                    raise HFError(f"{index}: shard {fname} (holding {name}) is missing")
                self.files[name] = f
        else:
            # Without an index: model.safetensors if present (so an adapter or other file beside it is
            # not mistaken for weights), else every *.safetensors file.
            single = path / SAFE_WEIGHTS_NAME
            shards = [single] if single.is_file() else sorted(path.glob("*.safetensors"))
            if not shards:
                raise HFError(f"{path}: no *.safetensors weights found (only safetensors checkpoints are supported)")
            for f in shards:
                for name in self._keys(f):
                    self.files[name] = f
        self._handles: dict[Path, Any] = {}

    @staticmethod
    def _keys(f: Path) -> list[str]:
        from safetensors import safe_open

        with safe_open(f, framework="np") as h:
            return list(h.keys())

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        f = self.files[name]
        if f not in self._handles:
            self._handles[f] = safe_open(f, framework="np").__enter__()
        try:
            return self._handles[f].get_tensor(name)
        except (TypeError, KeyError, ValueError):
            return read_safetensors_raw(f, name)

    def close(self) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()


def _hf_layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    D, H, K, Dh, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    Fe, S = cfg.expert_d_ff, cfg.n_shared_experts * cfg.expert_d_ff
    return {"attn_norm": (D,), "wq": (H * Dh, D), "wk": (K * Dh, D), "wv": (K * Dh, D), "wo": (D, H * Dh),
            "mlp_norm": (D,), "w_gate": (F, D), "w_up": (F, D), "w_down": (D, F),
            "bq": (H * Dh,), "bk": (K * Dh,), "bv": (K * Dh,),
            "moe_router": (cfg.n_experts, D), "moe_gate": (Fe, D), "moe_up": (Fe, D), "moe_down": (D, Fe),
            "shared_gate": (S, D), "shared_up": (S, D), "shared_down": (D, S), "shared_router": (1, D)}


def _layer_from_hf(key: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """One layer's HF tensor -> polychip per-layer layout (see the module docstring)."""
    D, Dh = cfg.d_model, cfg.head_dim
    if key in ("attn_norm", "mlp_norm"):
        return w
    if key in ("bq", "bk", "bv"):
        return w.reshape(-1, Dh)
    if key in ("wq", "wk", "wv"):
        return w.T.reshape(D, -1, Dh)
    if key == "wo":
        return w.T.reshape(-1, Dh, D)
    return w.T  # w_gate/w_up [F, D] -> [D, F]; w_down [D, F] -> [F, D]; MoE matrices alike


def _layer_to_hf(key: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    D = cfg.d_model
    if key in ("attn_norm", "mlp_norm"):
        return w
    if key in ("bq", "bk", "bv"):
        return w.reshape(-1)
    if key in ("wq", "wk", "wv"):
        return w.reshape(D, -1).T
    if key == "wo":
        return w.reshape(-1, D).T
    return w.T


def load_hf(path: str | os.PathLike, dtype: Any = "float32") -> tuple[ModelConfig, dict]:
    """Read a Hugging Face folder (Llama, Mistral, Qwen2, Gemma) -> (ModelConfig, params) in polychip's stacked layout.

    params leaves are host numpy arrays of `dtype` (float32/bfloat16; pass them to jax.device_put with
    a sharding to place them). Missing, extra or mis-shaped tensors raise HFError naming the tensor."""
    path = Path(path)
    if not path.is_dir():
        raise HFError(f"{path}: not a directory (expected a Hugging Face model folder)")
    cfg = config_from_hf(read_config(path))
    dt = np_dtype(dtype)
    ckpt = _Checkpoint(path)
    used: set[str] = set()

    def read(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in ckpt:
            raise HFError(f"{path}: tensor {name} is missing (expected shape {list(shape)})")
        w = ckpt.get(name)
        if tuple(w.shape) != tuple(shape):
            raise HFError(f"{path}: tensor {name} has shape {list(w.shape)}, expected {list(shape)} "
                          "from config.json")
        used.add(name)
        return w

    try:
        V, D, L = cfg.vocab_size, cfg.d_model, cfg.n_layers
        params: dict[str, Any] = {"embed": read("model.embed_tokens.weight", (V, D)).astype(dt)}
        hf_shapes = _hf_layer_shapes(cfg)
        layers: dict[str, np.ndarray] = {}
        per_layer = {k: s[1:] for k, s in _param_layer_shapes(cfg).items()}
        for key, suffix, idx in layer_entries(cfg):
            for i in range(L):
                w = _layer_from_hf(key, read(f"model.layers.{i}.{suffix}", hf_shapes[key]), cfg)
                if key not in layers:
                    layers[key] = np.empty((L, *per_layer[key]), dt)
                layers[key][(i, *idx)] = w
        params["layers"] = layers
        params["final_norm"] = read("model.norm.weight", (D,)).astype(dt)
        if cfg.tie_embeddings:
            used.add("lm_head.weight")  # some tied checkpoints still store a copy; HF ignores it too
        else:
            params["lm_head"] = np.ascontiguousarray(read("lm_head.weight", (V, D)).T.astype(dt))
    finally:
        ckpt.close()
    extra = sorted(n for n in ckpt.files if n not in used and not n.endswith(_IGNORED_SUFFIXES))
    if extra:
        shown = ", ".join(extra[:5]) + (f" (+{len(extra) - 5} more)" if len(extra) > 5 else "")
        raise HFError(f"{path}: unexpected tensors not in a {hf_family(cfg)} checkpoint: {shown}")
    return cfg, params


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def _hf_tensor_specs(cfg: ModelConfig, host: dict) -> list[tuple[str, Callable[[], np.ndarray]]]:
    """(HF name, producer of the HF-layout array) in HF's usual order."""
    specs: list[tuple[str, Callable[[], np.ndarray]]] = [("model.embed_tokens.weight", lambda: host["embed"])]
    for i in range(cfg.n_layers):
        for key, suffix, idx in layer_entries(cfg):
            specs.append((f"model.layers.{i}.{suffix}",
                          lambda key=key, i=i, idx=idx: _layer_to_hf(key, host["layers"][key][(i, *idx)], cfg)))
    specs.append(("model.norm.weight", lambda: host["final_norm"]))
    if not cfg.tie_embeddings:
        specs.append(("lm_head.weight", lambda: host["lm_head"].T))
    return specs


def _param_layer_shapes(cfg: ModelConfig) -> dict:
    from polychip.model.transformer import param_shapes

    return param_shapes(cfg)["layers"]


def _check_params(cfg: ModelConfig, params: dict) -> None:
    from polychip.model.transformer import param_shapes

    want = param_shapes(cfg)

    def walk(w: dict, p: dict, prefix: str) -> None:
        for k, shape in w.items():
            if k not in p:
                raise HFError(f"params: {prefix}{k} is missing (expected shape {list(shape) if isinstance(shape, tuple) else '...'})")
            if isinstance(shape, dict):
                walk(shape, p[k], f"{prefix}{k}.")
            elif tuple(p[k].shape) != shape:
                raise HFError(f"params: {prefix}{k} has shape {list(p[k].shape)}, expected {list(shape)}")

    walk(want, params, "")


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def save_hf(path: str | os.PathLike, cfg: ModelConfig, params: dict, dtype: str = "bfloat16",
            tokenizer_path: str | os.PathLike | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
            **extra_config: Any) -> Path:
    """Write a Hugging Face folder of cfg's family (hf_config.hf_family): config.json, generation_config.json, model.safetensors (or
    model-0000k-of-0000n.safetensors + model.safetensors.index.json above max_shard_bytes) and,
    when tokenizer_path is given (a tokenizer.json file or a folder holding one), tokenizer.json.

    Atomic: everything is written to a temporary folder beside `path`, then published (a rename when
    `path` does not exist; otherwise os.replace file by file, after which weight files of an earlier
    save that this one did not write are removed). `extra_config` (bos_token_id, ...) goes into
    config.json and generation_config.json. Returns the folder."""
    from safetensors.numpy import save_file

    path = Path(path)
    dt = np_dtype(dtype)
    hf_family(cfg)  # refuse an inexpressible model before writing anything
    _check_params(cfg, params)
    host = _to_host(params)
    specs = _hf_tensor_specs(cfg, host)

    # Group tensors into shards by size in the output dtype.
    shards: list[list[tuple[str, Callable[[], np.ndarray]]]] = [[]]
    size = 0
    total = 0
    for name, make in specs:
        nbytes = int(np.prod(_spec_shape(make))) * dt.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, make))
        size += nbytes
        total += nbytes

    if path.exists() and not path.is_dir():
        raise HFError(f"{path}: exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        written: list[str] = []
        n = len(shards)
        weight_map: dict[str, str] = {}
        for k, shard in enumerate(shards):
            fname = SAFE_WEIGHTS_NAME if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            tensors = {name: np.ascontiguousarray(make().astype(dt)) for name, make in shard}
            save_file(tensors, tmp / fname, metadata={"format": "pt"})
            del tensors
            weight_map.update({name: fname for name, _ in shard})
            written.append(fname)
        if n > 1:
            _write_json(tmp / SAFE_INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
            written.append(SAFE_INDEX_NAME)
        gen = {"_from_model_config": True}
        gen.update({k: v for k, v in extra_config.items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")})
        _write_json(tmp / GENERATION_CONFIG_NAME, gen)
        written.append(GENERATION_CONFIG_NAME)
        if tokenizer_path is not None:
            tok = Path(tokenizer_path)
            tok = tok / "tokenizer.json" if tok.is_dir() else tok
            if not tok.is_file():
                raise HFError(f"{tok}: tokenizer file not found")
            shutil.copyfile(tok, tmp / "tokenizer.json")
            written.append("tokenizer.json")
        # config.json last: a folder with a config.json is a complete one.
        _write_json(tmp / CONFIG_NAME, config_to_hf(cfg, dtype=dt.name, **extra_config))
        written.append(CONFIG_NAME)
        _publish(tmp, path, written)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _spec_shape(make: Callable[[], np.ndarray]) -> tuple[int, ...]:
    # Producers are views (transposes/reshapes) of host arrays: calling one costs no copy.
    return make().shape


def _to_host(params: dict) -> dict:
    """Params tree (jax or numpy leaves) -> numpy leaves (jax arrays are gathered once per leaf)."""
    return {k: _to_host(v) if isinstance(v, dict) else np.asarray(v) for k, v in params.items()}


def _publish(tmp: Path, path: Path, written: list[str]) -> None:
    if not path.exists():
        os.rename(tmp, path)
        return
    # Existing folder: replace our files one by one (each os.replace is atomic); config.json is last in
    # `written`. Then drop weight files from an earlier save that would shadow or confuse these.
    for fname in written:
        os.replace(tmp / fname, path / fname)
    keep = set(written)
    stale = [path / SAFE_WEIGHTS_NAME, path / SAFE_INDEX_NAME, *path.glob("model-*-of-*.safetensors")]
    for old in stale:
        if old.name not in keep and old.exists():
            old.unlink()


def copy_tokenizer(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[Path]:
    """Copy tokenizer.json (and tokenizer_config.json / special_tokens_map.json) from src_dir to
    dst_dir when present, each written atomically. Returns the destination paths written."""
    src, dst = Path(src_dir), Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for name in TOKENIZER_FILES:
        s = src / name
        if s.is_file():
            with open(s, "rb") as fh:
                out.append(atomic_write(dst / name, lambda f, fh=fh: shutil.copyfileobj(fh, f)))
    return out


def iter_hf_names(cfg: ModelConfig) -> Iterator[str]:
    """Every tensor name a polychip-compatible HF Llama checkpoint of cfg's family holds (tied: no lm_head)."""
    yield "model.embed_tokens.weight"
    for i in range(cfg.n_layers):
        for _, suffix, _ in layer_entries(cfg):
            yield f"model.layers.{i}.{suffix}"
    yield "model.norm.weight"
    if not cfg.tie_embeddings:
        yield "lm_head.weight"

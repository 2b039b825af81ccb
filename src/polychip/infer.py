"""What every inference path shares: the sampling parameters and their one validator, the sampler,
and loading weights + tokenizer for inference.

Used by `polychip generate` (generate.py), the serving engine (serve/) and the HTTP layer, so a
request means the same thing whichever way it arrives.

May import: files, yamlpos, config, hardware, data, kernels, parallel, model, train (layer 5;
tests/test_layers.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from polychip.config import ConfigError, ModelConfig
from polychip.model import transformer as T

#: Seeds are folded into [0, 2**31) so every path builds the same key from the same seed.
SEED_MOD = 2 ** 31
#: Most alternatives a request may ask log-probabilities for (OpenAI's top_logprobs limit); every
#: step computes this many so one compiled program serves all requests.
MAX_LOGPROBS = 20


class RequestError(ConfigError):
    """An impossible generation request. `param` names the offending field (the HTTP layer reports
    it as OpenAI's error.param); the CLI prints the message like any ConfigError."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class SamplingParams:
    #: 0 means greedy (argmax).
    temperature: float = 1.0
    #: Keep only the k most likely tokens (0: off).
    top_k: int = 0
    #: Keep the smallest set of tokens whose probability reaches p (1.0: off).
    top_p: float = 1.0
    seed: int = 0
    max_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    #: Report each generated token's log-probability and this many most likely alternatives
    #: (None: no log-probabilities; 0: only the chosen token's).
    logprobs: int | None = None

    def validate(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise RequestError(f"temperature must be a finite number >= 0, got {self.temperature}", "temperature")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {self.top_k}", "top_k")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.max_tokens < 0:
            raise RequestError(f"max_tokens must be >= 0, got {self.max_tokens}", "max_tokens")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise RequestError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", "logprobs")

    def step_values(self, vocab_size: int) -> tuple[float, int, float, int]:
        """(temperature, top_k, top_p, seed) as the jitted samplers take them: int32-safe, top_k at or
        above the vocabulary is "off" (0), the seed folded into [0, 2**31)."""
        top_k = self.top_k if 0 < self.top_k < vocab_size else 0
        return float(self.temperature), int(top_k), float(self.top_p), self.seed % SEED_MOD


def check_prompt(prompt: list[int], max_len: int, vocab_size: int | None = None) -> None:
    """The prompt must be non-empty, leave room for one generated token, and (when vocab_size is
    given) hold valid token ids."""
    n = len(prompt)
    if n == 0:
        raise RequestError("the prompt is empty", "prompt")
    if n >= max_len:
        raise RequestError(f"the prompt is {n} tokens; the model's context is {max_len} tokens", "prompt",
                           "context_length_exceeded")
    if vocab_size is not None and any(t < 0 or t >= vocab_size for t in prompt):
        raise RequestError(f"prompt token ids must be in [0, {vocab_size})", "prompt")


def check_text(text: str, param: str = "prompt") -> str:
    """`text` unchanged, or RequestError when it cannot be UTF-8 encoded (a lone surrogate such as
    "\\ud800", which JSON escapes and undecodable command-line bytes can carry; tokenizers refuse it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{param} is not valid Unicode: {e.object[e.start:e.end]!r} at character {e.start} "
                           "(a lone surrogate)", param) from None
    return text


def read_prompt_file(path: str) -> str:
    """The UTF-8 text of `path`; ConfigError (one line) for a missing, unreadable or binary file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read --prompt-file {path!r}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--prompt-file {path!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})"
                          ) from None
    if "\0" in text:
        raise ConfigError(f"--prompt-file {path!r} looks binary (it contains NUL bytes at offset {text.index(chr(0))})")
    return text


def token_budget(prompt: list[int], sp: SamplingParams, max_len: int) -> int:
    """Validate `sp` and the prompt; tokens that may be generated (max_tokens capped by the context)."""
    sp.validate()
    check_prompt(prompt, max_len)
    return min(sp.max_tokens, max_len - len(prompt))


def sample(logits, key, temperature, top_k, top_p):
    """logits [B, V] float32; temperature/top_p [B] float; top_k [B] int (0 = off) -> tokens [B] int32.
    key: one PRNG key for the batch, or one per row ([B] keys, each row drawing as a batch of one would).

    Rows with temperature 0 take the argmax. Filtering follows the usual order: top-k, then top-p on
    the renormalised distribution (the most likely token is always kept)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # Only what the batch needs runs (lax.cond executes the branch it takes): an all-greedy batch draws
    # nothing, and a batch without top-k / top-p draws from the scaled logits directly; only top-k / top-p
    # sort the vocabulary (15.8 ms per row for SmolLM2's 49k vocabulary on one CPU core, more than the
    # model's decode step). Plain draws and sorted draws differ for the same key, not in distribution.
    sampling = temperature > 0
    filtered = jnp.any(sampling & (((top_k > 0) & (top_k < logits.shape[-1])) | (top_p < 1.0)))
    branch = jnp.where(jnp.any(sampling), jnp.where(filtered, 2, 1), 0)
    return jax.lax.switch(branch, [lambda: greedy,
                                   lambda: _sample_plain(logits, key, temperature, greedy),
                                   lambda: _sample_filtered(logits, key, temperature, top_k, top_p, greedy)])


def _categorical(key, logits):
    """One draw per row: from one key for the batch, or per-row keys [B] (each as a batch of one)."""
    if key.ndim:
        return jax.vmap(lambda k, lg: jax.random.categorical(k, lg))(key, logits)
    return jax.random.categorical(key, logits, axis=-1)


def _scaled(logits, temperature):
    return logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]


def _sample_plain(logits, key, temperature, greedy):
    return jnp.where(temperature > 0, _categorical(key, _scaled(logits, temperature)).astype(jnp.int32), greedy)


def _sample_filtered(logits, key, temperature, top_k, top_p, greedy):
    V = logits.shape[-1]
    scaled = _scaled(logits, temperature)
    order = jnp.argsort(-scaled, axis=-1)
    sorted_l = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(V)[None, :]
    k = jnp.where(top_k > 0, top_k, V)[:, None]
    sorted_l = jnp.where(rank < k, sorted_l, -jnp.inf)
    probs = jax.nn.softmax(sorted_l, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above this token
    sorted_l = jnp.where((before < top_p[:, None]) | (rank == 0), sorted_l, -jnp.inf)
    choice = _categorical(key, sorted_l)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


# ----------------------------------------------------------------------------------------------
# Loading weights for inference: a polychip training folder, or a Hugging Face Llama folder.
# ----------------------------------------------------------------------------------------------
def load_for_inference(path: str | Path, dtype: str = "float32") -> tuple[ModelConfig, Any, Any]:
    """(model config, params on the default device, tokenizer) from `path`. dtype: float32, bfloat16, or
    int8 (weight-only: matmul weights int8 with per-channel scales, float32 compute; model.quant)."""
    from polychip.data.tokenizer import load_tokenizer
    from polychip.model.quant import inference_dtypes

    param_dtype, _, quant = inference_dtypes(dtype)

    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"checkpoint folder {str(p)!r} not found")
    if (p / "config.json").is_file() and not (p / "config.yaml").is_file():
        from polychip.model.hf import load_hf

        cfg, params = load_hf(p, dtype=T.DTYPES[param_dtype])
        if not (p / "tokenizer.json").is_file():
            raise ConfigError(f"{str(p)!r} has no tokenizer.json")
        return cfg, _quantize(jax.device_put(params), quant), load_tokenizer(p / "tokenizer.json")
    if not (p / "config.yaml").is_file():
        raise ConfigError(f"{str(p)!r} is neither a polychip run folder (config.yaml) nor a Hugging Face folder (config.json)")
    cfg, params = _load_run(p, param_dtype)
    return cfg, _quantize(params, quant), load_tokenizer(p / "tokenizer.json")


def inference_layout(params: Any, platform: str | None = None) -> Any:
    """params laid out for the inference steps of this platform (None: JAX's default backend); elsewhere
    than on a CPU, unchanged (one scanned program). On a CPU:
    - float32 matmul weights stored output-major (model/quant.py's "f32" QArray, the layout of the int8
      and bfloat16 ones), so that decode steps run them through the kernel registry's quant_matmul (its
      AVX-512 kernel streams the weights with software prefetch over helper threads; XLA's own one-row
      dot ran on one core: SmolLM2's float32 decode step, sampling included, 27.0 -> 22.2 ms on two
      cores). Only where that kernel can run: XLA's dot on the transposed layout took 32.6 ms;
    - the layers unstacked into a tuple (transformer.unstack_layers: XLA's CPU backend copies each
      layer's weights out of a stacked array inside the layer scan);
    - each layer's q/k/v and gate/up projections fused into one weight each where they are QArrays
      (transformer.fuse_projections: fewer, larger kernel calls).
    Idempotent: params already laid out are returned as they are."""
    if (platform or jax.default_backend()) != "cpu" or isinstance(params["layers"], tuple):
        return params
    from polychip.kernels.quant_matmul.cpu_ffi import ensure_registered
    from polychip.model.quant import is_quantized, quantize_params

    if not is_quantized(params) and params["layers"]["wq"].dtype == jnp.float32 and ensure_registered() is None:
        params = quantize_params(params, "f32")
    return T.fuse_projections(T.unstack_layers(params))


def _quantize(params: Any, quant: str | None) -> Any:
    if quant is None:
        return params
    from polychip.model.quant import quantize_params

    return quantize_params(params, quant)


def _load_run(p: Path, dtype: str) -> tuple[ModelConfig, Any]:
    """The newest good checkpoint of a `polychip train --out` folder, cast to `dtype`, on one device."""
    from polychip.config import Config, from_dict, load_yaml
    from polychip.train.checkpoint import Checkpointer, CheckpointError

    full = from_dict(Config, load_yaml(p / "config.yaml"))
    abstract = T.abstract_params(full.model, T.DTYPES[full.train.param_dtype])
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), abstract)
    ck = Checkpointer(p, keep=max(1, full.train.keep_checkpoints))
    try:
        got = ck.restore(abstract, None)
    finally:
        ck.close()
    if got is None:
        raise CheckpointError(f"no checkpoint in {str(p / 'checkpoints')!r}")
    return full.model, jax.tree.map(lambda x: x.astype(T.DTYPES[dtype]), got[1])


# ----------------------------------------------------------------------------------------------
# What the model's own files say about generating from it (Hugging Face folders), or today's
# rules for a polychip run folder.
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationConfig:
    """End-of-sequence ids, BOS rule, chat template and default sampling of one model."""

    #: Token ids that end a generation (the id is not emitted).
    eos_ids: frozenset[int] = frozenset()
    #: The tokenizer's BOS id (None: it has none).
    bos_id: int | None = None
    #: True: text prompts must start with bos_id (prepended when the tokenizer's post-processor does
    #: not add it); False: a leading bos_id is removed; None: whatever the tokenizer produces.
    add_bos: bool | None = None
    #: The special-token strings chat templates refer to as `bos_token` / `eos_token`.
    bos_token: str = ""
    eos_token: str = ""
    #: The model's Jinja chat template (None: it has none).
    chat_template: str | None = None
    #: A polychip run folder: chat prompts use the built-in transcript (serve/text.py), not a template.
    builtin_chat: bool = False
    #: Sampling defaults from generation_config.json: any of temperature, top_p, top_k.
    sampling_defaults: dict = field(default_factory=dict)

    def prompt_ids(self, ids: list[int]) -> list[int]:
        """Token ids of a text prompt, encoded with the tokenizer's post-processor, after the BOS rule."""
        if self.bos_id is None or self.add_bos is None:
            return ids
        has = bool(ids) and ids[0] == self.bos_id
        if self.add_bos and not has:
            return [self.bos_id, *ids]
        if not self.add_bos and has:
            return ids[1:]
        return ids

    def default(self, name: str, given, fallback):
        """`given` when the request/command line set it, else the model's default, else `fallback`."""
        if given is not None:
            return given
        return self.sampling_defaults.get(name, fallback)


def _read_json(p: Path) -> dict:
    import json

    if not p.is_file():
        return {}
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"cannot read {str(p)!r}: {e}") from None
    return obj if isinstance(obj, dict) else {}


def _ids(v) -> set[int]:
    if isinstance(v, bool) or v is None:
        return set()
    if isinstance(v, int):
        return {v}
    if isinstance(v, list):
        return {x for x in v if isinstance(x, int) and not isinstance(x, bool)}
    return set()


def _token_text(v) -> str:
    """tokenizer_config's bos_token/eos_token: a string, or an AddedToken dict {"content": ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else ""


def _chat_template(p: Path, tok_cfg: dict) -> str | None:
    """chat_template.jinja, else tokenizer_config.json's chat_template (a string, or a list of named
    templates of which "default" is the one transformers uses)."""
    f = p / "chat_template.jinja"
    if f.is_file():
        return f.read_text(encoding="utf-8")
    t = tok_cfg.get("chat_template")
    if isinstance(t, list):
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    return t if isinstance(t, str) and t.strip() else None


def _sampling_defaults(gen: dict) -> dict:
    """temperature/top_p/top_k from generation_config.json. do_sample: false (transformers: greedy
    whatever the temperature) makes greedy the default; without do_sample the values apply, as vLLM
    applies them."""
    out = {k: gen[k] for k in ("temperature", "top_p", "top_k")
           if isinstance(gen.get(k), (int, float)) and not isinstance(gen.get(k), bool)}
    if gen.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def builtin_generation_config(tok) -> GenerationConfig:
    """A polychip run folder (its files say nothing about generation): stop at the eos found by name
    (plus Llama-3's end of turn), add nothing to prompts, use the built-in chat transcript."""
    from polychip.data.tokenizer import special_ids

    eos = {i for r, i in special_ids(tok).items() if r == "eos"}
    eot = tok.token_to_id("<|eot_id|>")
    if eot is not None:
        eos.add(eot)
    return GenerationConfig(eos_ids=frozenset(eos), builtin_chat=True)


def load_generation_config(path: str | Path, tok) -> GenerationConfig:
    """The GenerationConfig of the checkpoint folder `path` (see load_for_inference) and its tokenizer.

    HF folders: EOS ids are config.json's eos_token_id together with generation_config.json's (each
    an id or a list), else tokenizer_config's eos_token; BOS follows tokenizer_config's
    add_bos_token where set, else the tokenizer's post-processor."""
    p = Path(path)
    if (p / "config.yaml").is_file() or not (p / "config.json").is_file():
        return builtin_generation_config(tok)
    cfg, gen, tok_cfg = _read_json(p / "config.json"), _read_json(p / "generation_config.json"), \
        _read_json(p / "tokenizer_config.json")
    bos_token, eos_token = _token_text(tok_cfg.get("bos_token")), _token_text(tok_cfg.get("eos_token"))
    eos = _ids(cfg.get("eos_token_id")) | _ids(gen.get("eos_token_id"))
    if not eos and eos_token and tok.token_to_id(eos_token) is not None:
        eos = {tok.token_to_id(eos_token)}
    bos_id = next(iter(_ids(gen.get("bos_token_id")) or _ids(cfg.get("bos_token_id"))), None)
    if bos_token and tok.token_to_id(bos_token) is not None:
        bos_id = tok.token_to_id(bos_token)
    add_bos = tok_cfg.get("add_bos_token")
    return GenerationConfig(eos_ids=frozenset(eos), bos_id=bos_id,
                            add_bos=add_bos if isinstance(add_bos, bool) else None, bos_token=bos_token,
                            eos_token=eos_token, chat_template=_chat_template(p, tok_cfg),
                            sampling_defaults=_sampling_defaults(gen))

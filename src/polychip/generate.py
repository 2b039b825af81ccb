"""Text generation with a KV cache: greedy, temperature, top-k, top-p, seed, stop strings, max tokens.

`sample(logits, key, temperature, top_k, top_p)` works row-wise on a batch with per-row settings, so
the serving engine uses the same function for a batch of requests with different parameters.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from polychip.config import ConfigError, ModelConfig
from polychip.kernels.registry import KernelPolicy
from polychip.model import transformer as T


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

    def validate(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 0:
            raise ConfigError(f"max_tokens must be >= 0, got {self.max_tokens}")


def sample(logits, key, temperature, top_k, top_p):
    """logits [B, V] float32; temperature/top_p [B] float; top_k [B] int (0 = off) -> tokens [B] int32.

    Rows with temperature 0 take the argmax. Filtering follows the usual order: top-k, then top-p on
    the renormalised distribution (the most likely token is always kept)."""
    B, V = logits.shape
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    scaled = logits / t
    order = jnp.argsort(-scaled, axis=-1)
    sorted_l = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(V)[None, :]
    k = jnp.where(top_k > 0, top_k, V)[:, None]
    sorted_l = jnp.where(rank < k, sorted_l, -jnp.inf)
    probs = jax.nn.softmax(sorted_l, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above this token
    sorted_l = jnp.where((before < top_p[:, None]) | (rank == 0), sorted_l, -jnp.inf)
    choice = jax.random.categorical(key, sorted_l, axis=-1)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


@dataclass
class Generation:
    text: str
    tokens: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (eos or stop string) or "length"


def _bucket(n: int, cap: int) -> int:
    b = 16
    while b < n:
        b *= 2
    return min(b, cap)


class Generator:
    """Single-sequence KV-cached decoding for the CLI (the server has its own batched engine)."""

    def __init__(self, cfg: ModelConfig, params: Any, tokenizer: Any = None, policy: KernelPolicy | None = None,
                 compute_dtype: str = "float32"):
        self.cfg = cfg
        self.params = params
        self.tok = tokenizer
        self.rt = T.Runtime(policy or KernelPolicy.create(), None, compute_dtype)
        self.max_len = cfg.max_seq_len

        @functools.partial(jax.jit, donate_argnums=(2,))
        def prefill(params, tokens, cache, last):
            lg, cache = T.logits(params, tokens, cfg, self.rt, cache=cache, cache_pos=jnp.int32(0))
            return jnp.take(lg[0], last, axis=0)[None], cache

        @functools.partial(jax.jit, donate_argnums=(2,))
        def decode(params, token, cache, pos):
            lg, cache = T.logits(params, token, cfg, self.rt, cache=cache, cache_pos=pos)
            return lg[:, -1], cache

        self._prefill, self._decode = prefill, decode
        self._sample = jax.jit(sample)

    def generate_ids(self, prompt: list[int], sp: SamplingParams, eos_id: int | None = None,
                     on_token=None) -> tuple[list[int], str]:
        sp.validate()
        n = len(prompt)
        if n == 0:
            raise ConfigError("the prompt is empty")
        if n >= self.max_len:
            raise ConfigError(f"prompt is {n} tokens; the model's context is {self.max_len}")
        budget = min(sp.max_tokens, self.max_len - n)
        cache = T.init_cache(self.cfg, 1, self.max_len, T.DTYPES[self.rt.compute_dtype])
        padded = np.zeros((1, _bucket(n, self.max_len)), np.int32)
        padded[0, :n] = prompt
        key = jax.random.key(sp.seed)
        temp = jnp.array([sp.temperature], jnp.float32)
        tk = jnp.array([sp.top_k], jnp.int32)
        tp = jnp.array([sp.top_p], jnp.float32)
        out: list[int] = []
        if budget == 0:
            return out, "length"
        lg, cache = self._prefill(self.params, jnp.asarray(padded), cache, jnp.int32(n - 1))
        pos = n
        while True:
            key, sub = jax.random.split(key)
            nxt = int(self._sample(lg, sub, temp, tk, tp)[0])
            if eos_id is not None and nxt == eos_id:
                return out, "stop"
            out.append(nxt)
            if on_token is not None and on_token(out):
                return out, "stop"
            if len(out) >= budget:
                return out, "length"
            lg, cache = self._decode(self.params, jnp.asarray([[nxt]], jnp.int32), cache, jnp.int32(pos))
            pos += 1

    def generate(self, prompt: str, sp: SamplingParams) -> Generation:
        from polychip.data.tokenizer import special_ids

        ids = special_ids(self.tok)
        prompt_ids = self.tok.encode(prompt).ids
        if "bos" in ids and ids.get("bos") not in (None, ids.get("eos")) and _wants_bos(self.tok):
            prompt_ids = [ids["bos"]] + prompt_ids
        hit: list[str] = []

        def check_stop(out):
            if not sp.stop:
                return False
            text = self.tok.decode(out)
            for s in sp.stop:
                if s and s in text:
                    hit.append(s)
                    return True
            return False

        out, reason = self.generate_ids(prompt_ids, sp, ids.get("eos"), check_stop)
        text = self.tok.decode(out)
        if hit:
            text = text[: text.index(hit[0])]
        return Generation(text, out, len(prompt_ids), reason)


def _wants_bos(tok) -> bool:
    """Llama-3 tokenizers add <|begin_of_text|> themselves via their post-processor; ours add nothing."""
    return False


def generate_uncached(cfg: ModelConfig, params, prompt: list[int], n: int, policy: KernelPolicy | None = None) -> list[int]:
    """Greedy decoding recomputing the whole sequence each step (the test oracle for the cache)."""
    rt = T.Runtime(policy or KernelPolicy.create())
    f = jax.jit(lambda p, t: T.logits(p, t, cfg, rt)[0])
    seq = list(prompt)
    for _ in range(n):
        lg = f(params, jnp.asarray([seq], jnp.int32))
        seq.append(int(jnp.argmax(lg[0, -1])))
    return seq[len(prompt):]


# ----------------------------------------------------------------------------------------------
# Loading weights for inference: a polychip training folder, or a Hugging Face Llama folder.
# ----------------------------------------------------------------------------------------------
def load_for_inference(path: str | Path, dtype: str = "float32") -> tuple[ModelConfig, Any, Any]:
    """(model config, params on the default device, tokenizer) from `path`."""
    from polychip.config import Config, from_dict, load_yaml
    from polychip.data.tokenizer import load_tokenizer

    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"checkpoint folder {str(p)!r} not found")
    if (p / "config.json").is_file() and not (p / "config.yaml").is_file():
        from polychip.model.hf import load_hf

        cfg, params = load_hf(p, dtype=T.DTYPES[dtype])
        if not (p / "tokenizer.json").is_file():
            raise ConfigError(f"{str(p)!r} has no tokenizer.json")
        return cfg, jax.device_put(params), load_tokenizer(p / "tokenizer.json")
    if not (p / "config.yaml").is_file():
        raise ConfigError(f"{str(p)!r} is neither a polychip run folder (config.yaml) nor a Hugging Face folder (config.json)")
    full = from_dict(Config, load_yaml(p / "config.yaml"))
    from polychip.train.checkpoint import Checkpointer, CheckpointError

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
    params = jax.tree.map(lambda x: x.astype(T.DTYPES[dtype]), got[1])
    return full.model, params, load_tokenizer(p / "tokenizer.json")

"""`polychip generate`: single-sequence text generation with a contiguous KV cache (greedy,
temperature, top-k, top-p, seed, stop strings, max tokens).

The sampling parameters, their validator, the sampler and the loader live in polychip.infer, which
the serving engine shares; they are re-exported here for callers of the old names.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from polychip.config import ModelConfig
from polychip.infer import (GenerationConfig, SamplingParams, builtin_generation_config, inference_layout,
                            load_for_inference, sample, token_budget)
from polychip.kernels.registry import KernelPolicy
from polychip.model import transformer as T

__all__ = ["Generation", "Generator", "SamplingParams", "generate_uncached", "load_for_inference", "sample"]


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
                 compute_dtype: str = "float32", gcfg: GenerationConfig | None = None):
        self.cfg = cfg
        self.params = inference_layout(params)
        self.tok = tokenizer
        #: EOS ids, BOS rule and chat template (infer.load_generation_config); default: a run folder's.
        self.gcfg = gcfg if gcfg is not None or tokenizer is None else builtin_generation_config(tokenizer)
        self.rt = T.Runtime(policy or KernelPolicy.create(), None, compute_dtype)
        self.max_len = cfg.max_seq_len

        @functools.partial(jax.jit, donate_argnums=(2,))
        def prefill(params, tokens, cache, last):
            lg, cache = T.logits(params, tokens, cfg, self.rt, cache=cache, cache_pos=jnp.int32(0))
            return jnp.take(lg[0], last, axis=0)[None], cache

        @functools.partial(jax.jit, donate_argnums=(2,))
        def advance(params, lg, cache, pos, key, temp, tk, tp):
            """Sample the next token from lg, then run it through the model: one program (and one host
            round trip) per token. Token, position and key stay on the device; only the token id is read
            back. (Separate sample, key-split, scalar and decode calls cost about 2 ms per token on a CPU,
            a tenth of SmolLM2's decode step.)"""
            key, sub = jax.random.split(key)
            tok = sample(lg, sub, temp, tk, tp)
            lg, cache = T.logits(params, tok[:, None], cfg, self.rt, cache=cache, cache_pos=pos)
            return tok, lg[:, -1], cache, pos + 1, key

        @jax.jit
        def last(lg, key, temp, tk, tp):
            """The final token of a budget: sampled the same way, no model step after it."""
            return sample(lg, jax.random.split(key)[1], temp, tk, tp)

        self._prefill, self._advance, self._last = prefill, advance, last

    def generate_ids(self, prompt: list[int], sp: SamplingParams, eos_id: int | frozenset[int] | None = None,
                     on_token=None) -> tuple[list[int], str]:
        """Tokens after `prompt` and the finish reason; generation ends (without emitting it) at any id
        in eos_id (one id or a set), or when on_token(tokens so far) returns True."""
        stop_ids = frozenset() if eos_id is None else frozenset([eos_id] if isinstance(eos_id, int) else eos_id)
        budget = token_budget(prompt, sp, self.max_len)
        n = len(prompt)
        # The cache holds prompt + budget, rounded up to a power of two (T.cache_length): every decode step
        # reads the whole cache, so sizing it for the model's full context made each step read up to 40x
        # more than it needs (issue 11: SmolLM2's 8192 context for ~200-token turns).
        cache_len = T.cache_length(n + budget, self.cfg)
        cache = T.init_cache(self.cfg, 1, cache_len, T.DTYPES[self.rt.compute_dtype],
                             per_layer=isinstance(self.params["layers"], tuple))
        padded = np.zeros((1, _bucket(n, cache_len)), np.int32)
        padded[0, :n] = prompt
        t, k, p, seed = sp.step_values(self.cfg.vocab_size)
        key = jax.random.key(seed)
        temp = jnp.array([t], jnp.float32)
        tk = jnp.array([k], jnp.int32)
        tp = jnp.array([p], jnp.float32)
        out: list[int] = []
        if budget == 0:
            return out, "length"
        lg, cache = self._prefill(self.params, jnp.asarray(padded), cache, jnp.int32(n - 1))
        state = (lg, cache, jnp.int32(n), key)

        def dispatch(j: int):
            """Token j (1-based) and, unless it is the budget's last, the model step on it: (token, state)."""
            lg, cache, pos, key = state
            if j < budget:
                tok, lg, cache, pos, key = self._advance(self.params, lg, cache, pos, key, temp, tk, tp)
                return tok, (lg, cache, pos, key)
            return self._last(lg, key, temp, tk, tp), None

        # One step ahead: step j + 1 is dispatched (JAX runs it asynchronously) before token j is read back,
        # so Python's dispatch of a ~300-array call overlaps the running step instead of following it.
        # A reply that then ends on token j (EOS, stop string) has had up to two model steps run for nothing.
        tok, state = dispatch(1)
        for j in range(1, budget + 1):
            ahead = dispatch(j + 1) if j < budget else None
            nxt = int(tok[0])
            if nxt in stop_ids:
                return out, "stop"
            out.append(nxt)
            if on_token is not None and on_token(out):
                return out, "stop"
            if ahead is not None:
                tok, state = ahead
        return out, "length"

    def generate(self, prompt: str, sp: SamplingParams) -> Generation:
        """Continue the text `prompt` (encoded by the tokenizer, then the model's BOS rule)."""
        return self._generate(self.gcfg.prompt_ids(self.tok.encode(prompt).ids), sp)

    def chat(self, messages: list[dict], sp: SamplingParams) -> Generation:
        """The assistant's reply to messages [{"role", "content"}], through the model's chat template."""
        from polychip.serve.text import render_chat

        ids, extra_stops = render_chat(self.tok, self.gcfg, messages)
        return self._generate(ids, dataclasses.replace(sp, stop=sp.stop + extra_stops))

    def _generate(self, prompt_ids: list[int], sp: SamplingParams) -> Generation:
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

        out, reason = self.generate_ids(prompt_ids, sp, self.gcfg.eos_ids, check_stop)
        text = self.tok.decode(out)
        if hit:
            text = text[: text.index(hit[0])]
        return Generation(text, out, len(prompt_ids), reason)


def generate_uncached(cfg: ModelConfig, params, prompt: list[int], n: int, policy: KernelPolicy | None = None) -> list[int]:
    """Greedy decoding recomputing the whole sequence each step (the test oracle for the cache).

    Every step runs the full forward pass over the sequence so far, zero-padded to len(prompt) + n (one
    compiled shape; causal attention keeps the padding out of the logits read at the last real token)."""
    rt = T.Runtime(policy or KernelPolicy.create())
    f = jax.jit(lambda p, t, i: T.logits(p, t, cfg, rt)[0][0, i])
    seq = np.zeros((1, len(prompt) + n), np.int32)
    seq[0, :len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + n):
        seq[0, i] = int(jnp.argmax(f(params, jnp.asarray(seq), i - 1)))
    return seq[0, len(prompt):].tolist()

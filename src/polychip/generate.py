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
    """Prefill length for an n-token prompt: 16, 24, 32, 48, 64, 96, ... (powers of two and 1.5x them, so
    padding wastes at most a third of the prefill and a chat session compiles few shapes), at most cap."""
    b = 16
    while b < n:
        b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3
    return min(b, cap)


class Generator:
    """Single-sequence KV-cached decoding for the CLI (the server has its own batched engine)."""

    #: Decode steps per dispatched program (Generator.generate_ids).
    STEPS = 8

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

        @functools.partial(jax.jit, donate_argnums=(2,), static_argnames=("steps",))
        def advance(params, lg, cache, pos, key, temp, tk, tp, n, stop, *, steps):
            """Up to `steps` tokens in one program: sample a token from lg, run it through the model, repeat,
            n times (n <= steps) or until a token in `stop` (EOS ids, -1 padded) was sampled. Returns the
            tokens ([steps], the first `count` valid), count, and the state after them. One dispatch and one
            host round trip per `steps` tokens: per token they cost about 1 ms of a 22 ms float32 SmolLM2
            step on a 2-core CPU (Python flattening ~300 weight arrays, and the sync), which a loop on the
            device does not pay (vLLM's multi-step scheduling does the same)."""
            def cond(c):
                return (c[0] < n) & ~c[-1]

            def body(c):
                i, toks, lg, cache, pos, key, _ = c
                key, sub = jax.random.split(key)
                tok = sample(lg, sub, temp, tk, tp)
                lg, cache = T.logits(params, tok[:, None], cfg, self.rt, cache=cache, cache_pos=pos)
                return i + 1, toks.at[i].set(tok[0]), lg[:, -1], cache, pos + 1, key, jnp.any(tok[0] == stop)

            init = (jnp.int32(0), jnp.full((steps,), -1, jnp.int32), lg, cache, pos, key, jnp.bool_(False))
            count, toks, lg, cache, pos, key, _ = jax.lax.while_loop(cond, body, init)
            return toks, count, lg, cache, pos, key

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
        pos = jnp.int32(n)
        stop = np.full((max(8, len(stop_ids)),), -1, np.int32)
        stop[:len(stop_ids)] = sorted(stop_ids)
        stop = jnp.asarray(stop)
        # Chunks of up to STEPS tokens per program; the budget's last token is sampled without a model step
        # after it. A reply that ends on a stop string (checked here, on the host) has run at most STEPS - 1
        # model steps for nothing; one that ends on EOS stops on the device.
        while len(out) < budget:
            left = budget - len(out)
            if left == 1:
                toks = [int(self._last(lg, key, temp, tk, tp)[0])]
            else:
                toks, count, lg, cache, pos, key = self._advance(self.params, lg, cache, pos, key, temp, tk, tp,
                                                                 jnp.int32(min(self.STEPS, left - 1)), stop,
                                                                 steps=self.STEPS)
                toks = np.asarray(toks)[: int(count)].tolist()
            for tok in toks:
                if tok in stop_ids:
                    return out, "stop"
                out.append(tok)
                if on_token is not None and on_token(out):
                    return out, "stop"
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

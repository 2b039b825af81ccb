"""The paged server runs a mixture-of-experts model: greedy tokens from the engine (chunked prefill +
batched paged decode) equal a greedy loop over the full forward pass of moe-tiny."""
import threading

import jax
import jax.numpy as jnp
import numpy as np

from polychip.config import MODEL_PRESETS
from polychip.generate import SamplingParams
from polychip.kernels import KernelPolicy
from polychip.model import transformer as T
from polychip.serve.engine import Engine, EngineConfig


def _greedy(cfg, params, prompt, n):
    rt, toks = T.Runtime(KernelPolicy.create()), list(prompt)
    for _ in range(n):
        lg = T.logits(params, jnp.asarray([toks], jnp.int32), cfg, rt)[0]
        toks.append(int(jnp.argmax(lg[0, -1])))
    return toks[len(prompt):]


def test_engine_serves_moe_tiny_greedily():
    cfg = MODEL_PRESETS["moe-tiny"]
    params = T.init_params(cfg, jax.random.key(0))
    params["layers"]["moe_router"] = jax.random.normal(jax.random.key(1), params["layers"]["moe_router"].shape)
    engine = Engine(cfg, params, EngineConfig(max_batch=2, page_size=8, prefill_chunk=16, kv_blocks=33))
    engine.start()
    try:
        prompts = [list(np.random.default_rng(s).integers(0, cfg.vocab_size, 21)) for s in (1, 2)]
        out, done = {0: [], 1: []}, [threading.Event(), threading.Event()]

        def sink(i):
            def f(ev):
                if ev[0] == "token":
                    out[i].append(int(ev[1]))
                else:
                    done[i].set()
            return f

        for i, p in enumerate(prompts):
            engine.submit([int(t) for t in p], SamplingParams(temperature=0, max_tokens=6), sink(i))
        assert all(d.wait(600) for d in done)
    finally:
        engine.stop()
    for i, p in enumerate(prompts):
        assert out[i] == _greedy(cfg, params, p, 6)

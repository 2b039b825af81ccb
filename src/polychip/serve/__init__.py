"""Serving, in vLLM v1's three parts: the scheduler (scheduler: queue, admission, chunked prefill,
prefix reuse), the block manager between it and the device (kv_cache), and the runner (runner: one
jitted step over the paged cache from paged_model.jit_step). engine drives them on a thread; api (app,
errors, small routes), completions (the generation routes), protocol, text (chat templates, stop
strings), logprobs and metrics (Prometheus, vLLM-like names) are the OpenAI-compatible HTTP layer; profile
captures jax.profiler traces of engine steps on request (/admin/profile); cli is `polychip serve`.

Owns: the scheduler, the paged KV cache (block manager), the runner, the engine, the OpenAI-compatible HTTP API.
May import: files, yamlpos, config, hardware, data, kernels, parallel, model, train, estimate, plan, infer (layer 6;
tests/test_layers.py).
"""

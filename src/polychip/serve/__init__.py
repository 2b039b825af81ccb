"""Serving: paged KV cache (kv_cache), the model step over it (paged_model), the continuous-batching
engine (engine), the OpenAI-compatible HTTP app (api, protocol, text, metrics) and `polychip serve` (cli).

Owns: the paged KV cache, the model step over it, the engine, the OpenAI-compatible HTTP API.
May import: files, yamlpos, config, hardware, data, kernels, parallel, model, train (layer 5; tests/test_layers.py).
"""

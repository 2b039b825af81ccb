"""Serving: paged KV cache (kv_cache), the model step over it (paged_model), the continuous-batching
engine (engine), the OpenAI-compatible HTTP app (api, protocol, text, metrics) and `polychip serve` (cli)."""

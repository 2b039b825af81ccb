"""Serving, in vLLM v1's three parts: the scheduler (scheduler: queue, admission, chunked prefill,
prefix reuse), the block manager between it and the device (kv_cache), and the runner (runner: one
jitted step over the paged cache from paged_model.jit_step). engine drives them on a thread; api,
protocol, text and metrics are the OpenAI-compatible HTTP layer; cli is `polychip serve`."""

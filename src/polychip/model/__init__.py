"""Llama-style decoder as pure functions over a params pytree."""

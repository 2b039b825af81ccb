"""Llama-style decoder as pure functions over a params pytree.

Owns: the Llama-style transformer, the one FLOPs and MFU formula, Hugging Face conversion.
May import: files, yamlpos, config, hardware, data, kernels, parallel (layer 3; tests/test_layers.py).
"""

"""Llama-style decoder as pure functions over a params pytree.

Owns: the Llama-style transformer (with the Qwen2/Mistral/Gemma options), the one FLOPs and MFU formula,
Hugging Face conversion (hf.py, hf_config.py), weight-only int8 (quant.py).
May import: files, yamlpos, config, hardware, data, kernels, parallel (layer 3; tests/test_layers.py).
"""

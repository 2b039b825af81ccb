"""Training: optimiser, jitted step, metrics, checkpoints, the loop.

Owns: the optimiser, the jitted train step, the loop, checkpoints, metrics, the step bench.
May import: files, yamlpos, config, hardware, data, kernels, parallel, model (layer 4; tests/test_layers.py).
"""

"""Device mesh, logical-axis sharding rules, multi-process start-up.

Owns: the device mesh, logical-axis -> mesh-axis rules, multi-process start-up.
May import: files, yamlpos, config, hardware (layer 2; tests/test_layers.py).
"""

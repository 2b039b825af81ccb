"""Kernel library: one folder per op (api.py, reference.py, one file per backend), one registry.

Owns: the kernel registry (registration, selection per device, per-shard placement) and one folder per op.
May import: files, config, hardware (layer 2; tests/test_layers.py).
"""
from polychip.kernels.registry import KernelError, KernelPolicy, Target, implementations, ops, register, resolve

__all__ = ["KernelError", "KernelPolicy", "Target", "implementations", "ops", "register", "resolve"]

"""Kernel library: one folder per op (api.py, reference.py, one file per backend), one registry, one
call path (`KernelPolicy.call`); see README.md in this folder.

Owns: the kernel registry (registration, selection per device, per-shard placement) and one folder per op.
May import: files, yamlpos, config, hardware (layer 2; tests/test_layers.py).
"""
from polychip.kernels.registry import (KernelError, KernelPolicy, Op, Target, declare, implementations, kernel, ops,
                                       register, resolve)

__all__ = ["KernelError", "KernelPolicy", "Op", "Target", "declare", "implementations", "kernel", "ops", "register",
           "resolve"]

"""Kernel library: one folder per op (api.py, reference.py, one file per backend), one registry."""
from polychip.kernels.registry import KernelError, KernelPolicy, Target, implementations, ops, register, resolve

__all__ = ["KernelError", "KernelPolicy", "Target", "implementations", "ops", "register", "resolve"]

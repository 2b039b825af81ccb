"""polychip: one JAX/XLA LLM codebase for a mixed TPU / Trainium / NVIDIA fleet."""
__version__ = "0.1.0"

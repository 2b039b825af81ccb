from polychip.kernels.attention.api import attention

__all__ = ["attention"]

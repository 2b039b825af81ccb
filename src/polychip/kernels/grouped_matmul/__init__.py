from polychip.kernels.grouped_matmul.api import grouped_matmul

__all__ = ["grouped_matmul"]

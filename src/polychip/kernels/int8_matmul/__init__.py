from polychip.kernels.int8_matmul.api import int8_matmul

__all__ = ["int8_matmul"]

from polychip.kernels.quant_matmul.api import quant_matmul

__all__ = ["quant_matmul"]

from polychip.kernels.cross_entropy.api import cross_entropy

__all__ = ["cross_entropy"]

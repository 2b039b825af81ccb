from polychip.kernels.ragged_all_to_all.api import ragged_all_to_all

__all__ = ["ragged_all_to_all"]

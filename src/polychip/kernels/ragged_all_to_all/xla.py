"""jax.lax.ragged_all_to_all: XLA's ragged-all-to-all, which moves only the rows sent (TPU, GPU)."""
from __future__ import annotations

import jax

from polychip.kernels.registry import kernel


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name: str,
                      max_rows: int):
    del max_rows  # the ragged collective needs no bound
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                     axis_name=axis_name)


def _not_cpu(target, query):
    return "XLA:CPU has no ragged-all-to-all" if target.platform == "cpu" else None


KERNELS = (kernel("xla", ragged_all_to_all, priority=50, supported_on=_not_cpu,
                  verified="deviceless-compiled for TPU in CI; not executed here"),)

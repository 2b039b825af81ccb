"""Hardware: the chip catalog (one data file), device detection, peak FLOP/s (measured on CPU).

Owns: the chip catalog (catalog.yaml and its reader), device detection, measured CPU peak FLOP/s.
May import: files, yamlpos (layer 1; tests/test_layers.py).
"""
from polychip.hardware.catalog import (
    Chip,
    HardwareError,
    canonical_dtype,
    chip_for_device_kind,
    get_chip,
    load_catalog,
)
from polychip.hardware.detect import cpu_peak_flops, current_chip

__all__ = [
    "Chip", "HardwareError", "canonical_dtype", "chip_for_device_kind", "cpu_peak_flops",
    "current_chip", "get_chip", "load_catalog",
]

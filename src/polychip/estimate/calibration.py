"""Calibration of the estimator: achieved fractions of peak fitted on programs with published step times.

Until a fit is stored, `calibration_for` returns the uncalibrated roofline (band None), and reports say so.
"""
from __future__ import annotations

from polychip.estimate.ops import Calibration


def calibration_for(family: str) -> Calibration:
    """The fitted calibration for a chip family ("tpu", "gpu", "trainium", ...); uncalibrated when none fits."""
    return Calibration()

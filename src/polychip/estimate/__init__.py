"""One step-time estimator for `compile` (over a compiled HLO module) and `plan` (over an analytic op list).

Owns: the per-operation cost model (ops.py), its calibration and error band.
May import: files, yamlpos, config, hardware, data, kernels, parallel, model (layer 4; tests/test_layers.py).

A step is a list of `Op`s, each with the FLOPs and HBM bytes one device spends on it per execution and how
many times it runs per step (loop trip counts). Each compute op costs max(flops / peak, bytes / HBM
bandwidth); each collective costs its bytes over the link it crosses (within a slice / node, or across
them); the step is their sum under a stated overlap rule (`cost.estimate_step`). Nothing here is a
measurement: results are labelled "estimate" and carry the validated error band of their calibration.
"""
from polychip.estimate.ops import INTER, INTRA, Calibration, Machine, Op, StepEstimate, estimate_step, machine_for

__all__ = ["INTER", "INTRA", "Calibration", "Machine", "Op", "StepEstimate", "estimate_step", "machine_for"]

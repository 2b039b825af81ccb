"""Fleet planner: workloads x chip pools -> performance model -> MILP -> plan, cost, energy, launch specs.

Owns: fleet files, the performance model and benchmark records, the MILP, plan reports and launch specs.
May import: files, yamlpos, config, hardware, data, kernels, parallel, model, train, estimate (layer 5; tests/test_layers.py).
"""
from polychip.plan.errors import PlanError
from polychip.plan.fleet import Fleet, Pool, ServeWorkload, TrainWorkload, load_fleet, parse_fleet
from polychip.plan.perf import Calibration, PerfModel
from polychip.plan.records import Record, load_records, parse_record
from polychip.plan.solve import Placement, Plan, plan_fleet

__all__ = ["Calibration", "Fleet", "PerfModel", "Placement", "Plan", "PlanError", "Pool", "Record", "ServeWorkload",
           "TrainWorkload", "load_fleet", "load_records", "parse_fleet", "parse_record", "plan_fleet"]

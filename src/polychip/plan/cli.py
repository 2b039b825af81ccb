"""`polychip plan`: polychip.cli calls `add_parser`; `run` is the handler (its own error boundary, so
callers that parse arguments themselves get one-line errors too)."""
from __future__ import annotations

import argparse
import math
import sys

from polychip.plan.errors import PlanError
from polychip.plan.options import OBJECTIVES


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="place training runs and services across chip pools (MILP)",
                              description="Plan which workload runs where across a mixed TPU/Trainium/GPU fleet. "
                                          "The fleet file schema is in polychip/plan/fleet.py.")
    p.add_argument("fleet", help="fleet YAML file: pools, site power cap, workloads")
    p.add_argument("--objective", choices=OBJECTIVES, default="cost", help="minimise dollars, finishing time or energy")
    p.add_argument("--report", metavar="DIR", help="write plan.json, PNG plots, index.html and launch/*.yaml here")
    p.add_argument("--json", metavar="PATH", help="write the plan as JSON ('-' for stdout)")
    p.add_argument("--launch", metavar="DIR", help="write one SkyPilot task YAML per placement here")
    p.add_argument("--records", metavar="DIR", help="benchmark records (*.json) from polychip bench / compile")
    p.add_argument("--catalog", metavar="FILE", help="chip catalog overrides/additions (YAML, same layout)")
    p.add_argument("--scale-pool", action="append", default=[], metavar="POOL=FACTOR", help="what-if: scale a pool")
    p.add_argument("--price", action="append", default=[], metavar="NAME=USD",
                   help="what-if: USD per chip-hour for a pool (or every pool of a chip kind)")
    p.add_argument("--power-cap", metavar="POWER", help="what-if: site power cap, e.g. 500MW")
    p.add_argument("--time-limit", type=float, default=60.0, help="solver time limit in seconds")
    p.add_argument("--gap", type=float, default=1e-4, help="relative MIP gap at which the solver may stop")
    # polychip.cli's error boundary (guarded) runs `fn` and prefixes one-line errors with `prog`
    p.set_defaults(fn=run, prog="polychip plan")
    return p


def _check_args(args) -> None:
    from polychip.files import check_output_dir, check_output_file

    why = ((args.json and args.json != "-" and check_output_file(args.json, "--json"))
           or (args.report and check_output_dir(args.report, "--report"))
           or (args.launch and check_output_dir(args.launch, "--launch")))
    if why:
        raise PlanError(why)
    if not (math.isfinite(args.time_limit) and args.time_limit > 0):
        raise PlanError(f"--time-limit must be a positive number of seconds, got {args.time_limit}")
    if not (math.isfinite(args.gap) and 0 <= args.gap < 1):
        raise PlanError(f"--gap must be a relative gap in [0, 1), got {args.gap}")


def run(args) -> int:
    """Plan; print the table; write outputs. Returns 0 when a feasible plan was found, 1 when not, 2 on bad input
    (bad input raises; the CLI's error boundary turns it into one line and exit 2)."""
    import json

    from rich.console import Console

    from polychip.files import atomic_write
    from polychip.hardware import load_catalog
    from polychip.plan import report, whatif
    from polychip.plan.fleet import load_fleet
    from polychip.plan.launch import write_tasks
    from polychip.plan.perf import PerfModel
    from polychip.plan.published import published_records
    from polychip.plan.records import load_records
    from polychip.plan.solve import plan_fleet

    _check_args(args)
    catalog = load_catalog(args.catalog)
    fleet = load_fleet(args.fleet, catalog)
    records = published_records() + (load_records(args.records) if args.records else [])
    perf = PerfModel(records, catalog)
    # Wide enough for the plan table when output is not a terminal (logs, CI).
    console = Console(stderr=args.json == "-", width=None if sys.stdout.isatty() else 200)
    whatif_asked = bool(args.scale_pool or args.price or args.power_cap)
    # What-if arguments are checked before the (possibly minute-long) baseline solve.
    new_fleet, changes = whatif.apply(fleet, args.scale_pool, args.price, args.power_cap) if whatif_asked else (fleet, [])
    base = plan_fleet(fleet, perf, args.objective, time_limit=args.time_limit, gap=args.gap)
    plan, extra = base, []
    if whatif_asked:
        console.print("[bold]baseline[/]")
        report.print_plan(base, console)
        plan = plan_fleet(new_fleet, perf, args.objective, time_limit=args.time_limit, gap=args.gap)
        fleet = new_fleet
        console.print("[bold]what-if:[/] " + "; ".join(changes), highlight=False)
        report.print_plan(plan, console)
        extra = ["what-if: " + c for c in changes] + ["difference: " + d for d in whatif.diff(base, plan)]
        console.print("[bold]difference[/]")
        for d in whatif.diff(base, plan):
            console.print("  " + d, highlight=False)
    else:
        report.print_plan(plan, console)
    if args.json:
        body = report.plan_json(plan, fleet)
        if changes:
            body["whatif"] = {"changes": changes, "baseline": report.plan_json(base, fleet)}
        if args.json == "-":
            print(json.dumps(body, indent=1))
        else:
            atomic_write(args.json, json.dumps(body, indent=1))
    if args.launch:
        write_tasks(fleet, plan, args.launch)
    if args.report:
        path = report.write_report(plan, fleet, args.report, extra)
        console.print(f"report: {path}", highlight=False)
    return 0 if plan.status != "infeasible" else 1

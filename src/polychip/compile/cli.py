"""`polychip compile`: will this model fit on that pod, and how fast will it run (from a CPU host).

polychip.cli imports this module and calls add_parser(subparsers); the handler returns an exit code.
User mistakes raise CompileError / ConfigError, which polychip.cli prints on one line (exit 2).
"""
from __future__ import annotations

import argparse

from polychip.files import atomic_write_json, check_output_file
from polychip.config import MODEL_PRESETS


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compile", help="compile the real train/serve step for a TPU topology (no TPU needed): fit, FLOPs, est. MFU",
        description="Lower and compile the train step (or prefill + decode with --mode serve) for a target "
                    "without the hardware: TPU topologies through libtpu's deviceless compiler; GPU and "
                    "Trainium chips through an analytic roofline (labelled modelled).")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="dotted config overrides, e.g. train.remat=full train.compute_dtype=bfloat16")
    p.add_argument("--model", required=True, choices=list(MODEL_PRESETS), help="model preset")
    p.add_argument("--target", required=True,
                   help="v6e:16x16, tpu7x:4x4x4, v5e:2x2, v5p:2x2x1, v4:2x2x1 (append *N for N slices), or h100:8, trn2:16")
    p.add_argument("--mesh", help="e.g. fsdp=256 or data=2,fsdp=64,tensor=2 (product = devices; default all fsdp)")
    p.add_argument("--batch", type=int, help="global batch in sequences (default: the preset's)")
    p.add_argument("--seq", type=int, help="train: tokens per sequence; serve: prompt tokens (default: the preset's)")
    p.add_argument("--mode", choices=["train", "serve"], default="train", help="train step, or serve prefill + decode")
    p.add_argument("--output-tokens", type=int, default=128, help="serve: tokens generated per request (default 128)")
    p.add_argument("--search", action="store_true", help="try bounded alternatives (mesh, grad_accum, remat, dtype)")
    p.add_argument("--max-trials", type=int, default=12, help="--search: most configurations to compile (default 12)")
    p.add_argument("--json", metavar="OUT", help="write the report (or search results) as JSON to OUT")
    p.add_argument("--record", metavar="OUT", help="write a planner record (polychip.plan.records format) to OUT")
    p.add_argument("--no-cache", action="store_true", help="recompile even if a cached result exists")
    p.set_defaults(fn=handler)
    return p


def _write_json(path: str, obj) -> None:
    atomic_write_json(path, obj, default=str, sort_keys=False)


def _check_args(args) -> None:
    """Mistakes that would otherwise surface only after compiling (minutes for a big model)."""
    from polychip.compile.errors import CompileError

    for flag, path in (("--json", args.json), ("--record", args.record)):
        why = path and check_output_file(path, flag)
        if why:
            raise CompileError(why)
    for flag, v in (("--batch", args.batch), ("--seq", args.seq), ("--output-tokens", args.output_tokens),
                    ("--max-trials", args.max_trials)):
        if v is not None and v < 1:
            raise CompileError(f"{flag} must be >= 1, got {v}")


def handler(args) -> int:
    from polychip.compile import display
    from polychip.compile.report import planner_record
    from polychip.compile.run import Request, compile_report
    from polychip.compile.search import search

    _check_args(args)

    req = Request(model=args.model, target=args.target, mesh=args.mesh, batch=args.batch, seq=args.seq,
                  mode=args.mode, overrides=tuple(args.overrides), output_tokens=args.output_tokens,
                  use_cache=not args.no_cache)
    console = display._console()
    if args.search:
        rows = search(req, max_trials=args.max_trials, show_progress=True,
                      on_row=lambda r: console.print(
                          f"  tried mesh {r['mesh']} grad_accum {r['grad_accum']} remat {r['remat']} "
                          f"params {r['param_dtype']}: " + (f"error: {r['error']}" if r["error"] else
                                                            ("fits" if r["fits"] else "does not fit")), highlight=False))
        display.print_search(rows, console)
        if args.json:
            _write_json(args.json, {"search": rows})
        return 0 if any(r.get("fits") for r in rows) else 1
    rep = compile_report(req, show_progress=True)
    display.print_report(rep, console)
    if args.json:
        _write_json(args.json, rep)
    if args.record:
        rec = planner_record(rep)
        if rec is None:
            console.print("no planner record written: the configuration does not fit, is modelled, or uses remat=dots "
                          "(records know none|full)", highlight=False)
        else:
            _write_json(args.record, rec)
    return 0

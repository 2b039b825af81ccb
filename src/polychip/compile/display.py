"""Rich tables for compile reports and search results (stdout); JSON goes to files."""
from __future__ import annotations

_LABELS = [
    ("hbm_used_per_chip", "HBM used per chip"),
    ("hbm_used_per_device", "HBM used per device"),
    ("hbm_sum_per_device", "  all buffers at once"),
    ("hbm_per_device", "HBM per device"),
    ("hbm_per_chip", "HBM per chip"),
    ("hbm_margin_per_device", "HBM margin per device"),
    ("hbm_margin_per_chip", "HBM margin per chip"),
    ("compiler_available_hbm_per_device", "HBM usable per device (compiler)"),
    ("argument_bytes_per_device", "  arguments"),
    ("output_bytes_per_device", "  outputs"),
    ("alias_bytes_per_device", "  aliased (donated)"),
    ("temp_bytes_per_device", "  temporaries"),
    ("generated_code_bytes_per_device", "  generated code"),
    ("model_flops", "model FLOPs / step"),
    ("program_flops", "program FLOPs / step"),
    ("program_flops_per_device", "program FLOPs / device"),
    ("compiler_flops_per_device", "compiler FLOPs / device"),
    ("program_flops_loops_once_per_device", "program FLOPs / device, loops once"),
    ("compiler_bytes_accessed_per_device", "compiler bytes accessed / device"),
    ("compiler_optimal_seconds", "compiler optimal_seconds"),
    ("hbm_traffic_per_device", "HBM traffic / device"),
    ("collective_bytes_per_device", "collective bytes / device"),
    ("dcn_collective_bytes_per_device", "  of which across slices (DCN)"),
    ("estimate_flops_per_device", "est. FLOPs / device (HLO ops)"),
    ("declared_flops_per_device", "  of which Pallas kernels"),
    ("t_ops", "est. time: ops"),
    ("t_compute", "  compute-bound"),
    ("t_hbm", "  HBM-bound"),
    ("t_collectives", "est. time: collectives"),
    ("t_exposed_collectives", "  exposed"),
    ("step_time", "est. step time"),
    ("tokens_per_s_per_chip", "est. tokens/s per chip"),
    ("mfu", "est. MFU"),
    ("compile_time", "compile time"),
]


def fmt_value(v, unit: str) -> str:
    if v is None:
        return "n/a"
    if unit == "B":
        sign = "-" if v < 0 else ""
        a = abs(v)
        for u, s in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
            if a >= s:
                return f"{sign}{a / s:.2f} {u}"
        return f"{sign}{a:.0f} B"
    if unit == "FLOP":
        for u, s in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
            if abs(v) >= s:
                return f"{v / s:.3g} {u}"
        return f"{v:.3g} FLOP"
    if unit == "s":
        return f"{v * 1e3:.3g} ms" if abs(v) < 1 else f"{v:.3g} s"
    if unit == "tok/s":
        return f"{v:,.0f} tok/s"
    if unit == "":
        return f"{100 * v:.1f}%"
    return f"{v} {unit}"


def fmt_mfu(f: dict) -> str:
    """An MFU figure as reports may print it: a range when calibrated, an upper bound when not."""
    if f.get("range"):
        lo, hi = f["range"]
        return f"{100 * lo:.1f}-{100 * hi:.1f}% (est. {100 * f['value']:.1f}%)"
    if f.get("upper_bound"):
        return f"<= {100 * f['value']:.1f}% (upper bound)"
    return fmt_value(f["value"], f["unit"])


def _cell(key: str, f: dict) -> str:
    return fmt_mfu(f) if key == "mfu" else fmt_value(f["value"], f["unit"])


def _console():
    import sys

    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def print_report(rep: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or _console()
    t = rep["target"]
    head = (f"[bold]{rep['model']}[/] ({rep['n_params'] / 1e9:.2f}B params) {rep['mode']} on [bold]{t['text']}[/] "
            f"({t['chips']} x {t['chip']}, {t['devices']} devices), mesh {rep['mesh_text']}, batch {rep['batch']} x "
            f"seq {rep['seq']}, grad_accum {rep['grad_accum']}, remat {rep['remat']}, params {rep['param_dtype']}, "
            f"compute {rep['compute_dtype']}" + (" [dim](cached)[/]" if rep.get("cached") else ""))
    console.print(head, highlight=False)
    for s in rep["steps"]:
        tab = Table(title=f"{s['name']} step", title_justify="left", show_edge=False)
        tab.add_column("figure")
        tab.add_column("value", justify="right")
        tab.add_column("source")
        tab.add_column("note", overflow="fold")
        for key, label in _LABELS:
            f = s["figures"].get(key)
            if f is None:
                continue
            tab.add_row(label, _cell(key, f), f["source"], f.get("note", ""))
        console.print(tab)
        top = s["figures"].get("top_ops")
        if top and top["value"]:
            total = s["figures"]["step_time"]["value"]
            console.print("  top ops (estimate, per step): " + "; ".join(
                f"{n} {fmt_value(t, 's')} ({100 * t / total:.0f}%)" for n, t in top["value"][:5]), highlight=False)
        if s["fits"] is not None:
            figs = s["figures"]
            margin = figs.get("hbm_margin_per_device") or figs.get("hbm_margin_per_chip")
            used = figs.get("hbm_used_per_chip")
            verdict = "[green]fits[/]" if s["fits"] else "[red bold]does not fit[/]"
            by = fmt_value(abs(margin["value"]), "B") if margin else "?"
            console.print(f"  {verdict}: {fmt_value(used['value'], 'B')} per chip, "
                          f"{'spare' if s['fits'] else 'over'} {by} per {'device' if 'hbm_margin_per_device' in figs else 'chip'}",
                          highlight=False)
        for n in s["notes"]:
            console.print(f"  [dim]note: {n}[/]", highlight=False)
    if rep.get("measured"):
        m = rep["measured"]
        console.print(f"measured on this host ({m['devices']} x {m['device_kind']}): step {m['step_time_s'] * 1e3:.1f} ms, "
                      f"{m['tokens_per_s']:,.0f} tok/s, MFU {100 * (m['mfu'] or 0):.1f}%", highlight=False)


def print_search(rows: list[dict], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or _console()
    tab = Table(title="search: fitting configurations first, fastest first", title_justify="left", show_edge=False)
    for col in ("#", "mesh", "grad_accum", "remat", "param dtype", "fits", "HBM/chip", "est. step", "est. MFU", "source"):
        tab.add_column(col)
    for i, r in enumerate(rows, 1):
        if r.get("error"):
            tab.add_row(str(i), r["mesh"], str(r["grad_accum"]), r["remat"], r["param_dtype"], "error", "", "", "",
                        r["error"][:90])
            continue
        tab.add_row(str(i), r["mesh"], str(r["grad_accum"]), r["remat"], r["param_dtype"],
                    "yes" if r["fits"] else "[red]no[/]", fmt_value(r["hbm_used_per_chip"], "B"),
                    fmt_value(r["step_time"], "s"), fmt_mfu(r["mfu_figure"]) if r.get("mfu_figure") else "",
                    r["source"] + (" (cached)" if r.get("cached") else ""))
    console.print(tab)
    from polychip.compile.search import why  # search imports this module for its formatting

    console.print(why(rows), highlight=False)

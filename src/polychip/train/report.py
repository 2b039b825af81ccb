"""`polychip report RUN [RUN...]`: one HTML page plus PNGs from training run folders.

Figures (several runs are overlaid, one colour each):
  loss.png        train loss (raw, faint; smoothed, solid) and eval loss (dots) against step; checkpoints
                  as triangles on the x axis, restarts (resumed from a checkpoint) as dashed lines
  throughput.png  tokens/s and MFU against step (compile steps left out)
  step_time.png   histogram of step times (compile steps left out), median marked
  goodput.png     wall time by goodput category, all attempts of each run added up
  memory.png      device memory in use against step, where the platform reports it
The page adds a summary table per run, the goodput table, the event list and the config.
A step recomputed after a restart appears once in the curves: the later attempt's value wins.
"""
from __future__ import annotations

import html
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from polychip.files import atomic_write
from polychip.train import goodput


class ReportError(ValueError):
    """A folder that is not a run folder, or a run with nothing to show (one-line error, exit 2)."""


@dataclass
class RunData:
    name: str
    path: Path
    rows: list[dict]  # one per step, sorted; the last attempt's row for recomputed steps
    logged_rows: int  # lines in metrics.jsonl (more than rows after restarts)
    events: list[dict] = field(default_factory=list)
    goodput: dict | None = None
    config: str = ""

    def event_steps(self, kind: str) -> list[int]:
        return [e["step"] for e in self.events if e.get("event") == kind]

    def evals(self) -> dict[int, float]:
        """step -> eval loss, sorted; a recomputed step's eval from the later attempt."""
        ev = {e["step"]: e["eval_loss"] for e in self.events if e.get("event") == "eval"}
        return dict(sorted(ev.items()))

    def series(self, key: str, skip_compile: bool = False) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in self.rows
               if r.get(key) is not None and not (skip_compile and r.get("includes_compile"))]
        return [p[0] for p in pts], [p[1] for p in pts]


def _jsonl(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a killed process may be cut short
            continue
    return out


def load_run(path: str | Path, name: str | None = None) -> RunData:
    from polychip.train.observe import EVENTS  # here, so that building the CLI parser does not import jax

    p = Path(path)
    if not p.is_dir():
        raise ReportError(f"{p}: no such run folder")
    if not (p / "metrics.jsonl").exists():
        raise ReportError(f"{p}: no metrics.jsonl here; give a folder written by `polychip train --out`")
    logged = [r for r in _jsonl(p / "metrics.jsonl") if isinstance(r.get("step"), int)]
    if not logged:
        raise ReportError(f"{p}: metrics.jsonl has no steps yet")
    by_step = {r["step"]: r for r in logged}
    config = (p / "config.yaml").read_text() if (p / "config.yaml").exists() else ""
    return RunData(name or p.resolve().name, p, [by_step[s] for s in sorted(by_step)], len(logged),
                   _jsonl(p / EVENTS), goodput.load(p), config)


def _names(paths: list[str]) -> list[str]:
    """Folder names, or the paths as given where two folders share a name."""
    base = [Path(p).resolve().name for p in paths]
    return [b if base.count(b) == 1 else str(p) for b, p in zip(base, paths)]


def smooth(values: list[float], weight: float = 0.8) -> list[float]:
    """TensorBoard-style exponential moving average, debiased so the curve starts at the first value."""
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        acc, norm = weight * acc + (1 - weight) * v, weight * norm + (1 - weight)
        out.append(acc / norm)
    return out


def summary(run: RunData) -> dict:
    """The numbers of the page's table (None where the run has none)."""
    def med(key):
        ys = run.series(key, skip_compile=True)[1]
        return statistics.median(ys) if ys else None

    evals = list(run.evals().values())
    g = (run.goodput or {}).get("total", {})
    return {"final step": run.rows[-1]["step"], "attempts": 1 + len(run.event_steps("resume")),
            "steps recomputed": max(0, run.logged_rows - len(run.rows)),
            "checkpoints": len(run.event_steps("checkpoint")), "final loss": run.rows[-1].get("loss"),
            "last eval loss": evals[-1] if evals else None,
            "median step ms": None if med("step_time_s") is None else 1e3 * med("step_time_s"),
            "median tokens/s": med("tokens_per_s"),
            "median MFU %": None if med("mfu") is None else 100 * med("mfu"),
            "goodput %": None if g.get("goodput") is None else 100 * g["goodput"],
            "wall s": g.get("wall_s")}


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def _save(plt, fig, path: Path) -> str:
    """Lay out, write atomically and close `fig`; returns the file name."""
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path.name


def _label(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _plot_loss(plt, runs: list[RunData], folder: Path) -> str:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, run in enumerate(runs):
        c = f"C{i}"
        xs, ys = run.series("loss")
        ax.plot(xs, ys, color=c, alpha=0.25, linewidth=0.8)
        ax.plot(xs, smooth(ys), color=c, linewidth=1.6, label=f"{run.name} train")
        ev = run.evals()
        if ev:
            ax.plot(list(ev), list(ev.values()), "o--", color=c, markersize=4, linewidth=1, label=f"{run.name} eval")
        ck = run.event_steps("checkpoint")
        ax.plot(ck, [0.0] * len(ck), "^", color=c, markersize=7, clip_on=False, transform=ax.get_xaxis_transform(),
                label=f"{run.name} checkpoint" if ck else None)
        for j, s in enumerate(run.event_steps("resume")):
            ax.axvline(s, color=c, linestyle=":", linewidth=1.2, label=f"{run.name} restart" if j == 0 else None)
    _label(ax, "step", "loss", "Loss (faint: raw, solid: smoothed; triangles: checkpoints; dotted: restarts)")
    return _save(plt, fig, folder / "loss.png")


def _plot_throughput(plt, runs: list[RunData], folder: Path) -> str:
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    for i, run in enumerate(runs):
        a1.plot(*run.series("tokens_per_s", skip_compile=True), color=f"C{i}", linewidth=1.2, label=run.name)
        xs, ys = run.series("mfu", skip_compile=True)
        a2.plot(xs, [100 * y for y in ys], color=f"C{i}", linewidth=1.2, label=run.name)
    _label(a1, "", "tokens/s", "Throughput and MFU (first step of each attempt, which compiles, left out)")
    _label(a2, "step", "MFU %", "")
    return _save(plt, fig, folder / "throughput.png")


def _plot_step_time(plt, runs: list[RunData], folder: Path) -> str:
    fig, ax = plt.subplots(figsize=(9, 3.5))
    times = [[1e3 * y for y in run.series("step_time_s", skip_compile=True)[1]] for run in runs]
    every = [t for ms in times for t in ms]
    n_bins = min(40, max(5, len(every) // (2 * len(runs))))
    # One set of bin edges for all runs, so overlaid bars compare like with like.
    edges = [min(every or [0]) + k * (max(every or [1]) - min(every or [0])) / n_bins for k in range(n_bins + 1)]
    for i, (run, ms) in enumerate(zip(runs, times)):
        if ms:
            ax.hist(ms, bins=edges, color=f"C{i}", alpha=0.5, label=run.name)
            ax.axvline(statistics.median(ms), color=f"C{i}", linestyle="--", linewidth=1)
    ax.set_xlabel("step time, ms (dashed: median)")
    ax.set_ylabel("steps")
    ax.set_title("Step time (compile steps left out)")
    ax.legend(fontsize=7)
    return _save(plt, fig, folder / "step_time.png")


def _plot_goodput(plt, runs: list[RunData], folder: Path) -> str | None:
    have = [r for r in runs if r.goodput]
    if not have:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(have) + 2.2))
    left = [0.0] * len(have)
    for j, cat in enumerate(goodput.CATEGORIES):
        vals = [r.goodput["total"]["seconds"].get(cat, 0.0) for r in have]
        if any(vals):
            ax.barh([r.name for r in have], vals, left=left, color=f"C{j}", label=cat)
            left = [a + b for a, b in zip(left, vals)]
    for k, r in enumerate(have):
        share = r.goodput["total"].get("goodput")
        ax.text(left[k], k, f"  goodput {100 * share:.0f}%" if share is not None else "", va="center", fontsize=8)
    ax.set_xlim(0, 1.18 * max(left))  # room for the goodput labels
    ax.set_xlabel("wall seconds, all attempts")
    ax.set_title("Where the wall time went")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(plt, fig, folder / "goodput.png")


def _plot_memory(plt, runs: list[RunData], folder: Path) -> str | None:
    if not any(run.series("mem_bytes_in_use")[0] for run in runs):
        return None
    fig, ax = plt.subplots(figsize=(9, 3.5))
    for i, run in enumerate(runs):
        xs, ys = run.series("mem_bytes_in_use")
        ax.plot(xs, [y / 2**30 for y in ys], color=f"C{i}", label=f"{run.name} in use")
        xs, ys = run.series("mem_peak_bytes_in_use")
        ax.plot(xs, [y / 2**30 for y in ys], color=f"C{i}", linestyle="--", label=f"{run.name} peak")
    _label(ax, "step", "GiB (device 0)", "Device memory")
    return _save(plt, fig, folder / "memory.png")


def plots(runs: list[RunData], folder: Path) -> list[str]:
    """Write the PNGs into `folder`; returns their file names."""
    try:
        import matplotlib
    except ImportError as e:
        raise ReportError("polychip report draws with matplotlib, which is not installed: "
                          "pip install 'polychip[obs]' (or matplotlib==3.11.2)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [_plot_loss(plt, runs, folder), _plot_throughput(plt, runs, folder), _plot_step_time(plt, runs, folder),
             _plot_goodput(plt, runs, folder), _plot_memory(plt, runs, folder)]
    return [n for n in names if n]


def _table(header: list[str], rows: list[list]) -> str:
    e = html.escape
    head = "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"
    return "<table>" + head + "".join("<tr>" + "".join(f"<td>{e(_fmt(c))}</td>" for c in r) + "</tr>"
                                      for r in rows) + "</table>"


def _event_row(e: dict) -> list:
    details = {k: v for k, v in e.items() if k not in ("event", "step", "time")}
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["time"])) if "time" in e else ""
    return [when, e.get("event"), e.get("step"), ", ".join(f"{k}={_fmt(v)}" for k, v in details.items())]


def page(runs: list[RunData], images: list[str]) -> str:
    e = html.escape
    sums = [summary(r) for r in runs]
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>polychip run report</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "margin-bottom:1em}td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}pre{font-size:12px;"
             "background:#f6f6f6;padding:6px}</style></head><body>",
             f"<h1>polychip run report: {e(', '.join(r.name for r in runs))}</h1>",
             _table(["run", *sums[0]], [[r.name, *s.values()] for r, s in zip(runs, sums)])]
    parts += [f"<img src='{n}' alt='{n}'><br>" for n in images]
    cats = list(goodput.CATEGORIES)
    with_gp = [r for r in runs if r.goodput]
    if with_gp:
        parts.append("<h2>Goodput (seconds, all attempts)</h2>" + _table(
            ["run", "wall", *cats, "goodput %"],
            [[r.name, r.goodput["total"]["wall_s"], *[r.goodput["total"]["seconds"].get(c, 0.0) for c in cats],
              100 * (r.goodput["total"].get("goodput") or 0.0)] for r in with_gp]))
        parts.append(f"<pre>{e(goodput.__doc__.split('Categories:')[1].split('goodput =')[0].rstrip())}</pre>")
    for r in runs:
        parts.append(f"<h2>{e(r.name)}</h2><p>{e(str(r.path))}</p>")
        parts.append(_table(["UTC", "event", "step", "details"], [_event_row(ev) for ev in r.events]))
        parts.append(f"<details><summary>config.yaml</summary><pre>{e(r.config)}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dirs: list[str], folder: str | Path) -> Path:
    """PNGs and index.html for the runs in `run_dirs` into `folder`; returns the page's path."""
    runs = [load_run(p, n) for p, n in zip(run_dirs, _names(run_dirs))]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = plots(runs, folder)
    return atomic_write(folder / "index.html", page(runs, images))


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="HTML page + PNGs of one or more training runs (curves overlaid)",
                       description="Loss and eval loss, throughput and MFU, step-time histogram, checkpoints and "
                                   "restarts, goodput and the config of training run folders.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by `polychip train --out`")
    p.add_argument("--out", metavar="DIR", help="where to write index.html and the PNGs "
                                                "(default: RUN/report for one run, ./report for several)")
    p.set_defaults(fn=cmd_report)


def cmd_report(args) -> int:
    folder = args.out or (str(Path(args.runs[0]) / "report") if len(args.runs) == 1 else "report")
    print(f"report: {write_report(args.runs, folder)}")
    return 0

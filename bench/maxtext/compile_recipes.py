"""Compile Google MaxText's published training recipes deviceless and cache their optimised HLO.

Runs in the MaxText venv (bench/maxtext/setup_venv.sh), not polychip's: it imports nothing of polychip, so
the cache layout is spelled out here and read by bench/estimate_calibration.py.

For each recipe in recipes.yaml (smallest first, one at a time), it runs MaxText's own train_compile
(`python -m maxtext.trainers.pre_train.train_compile <base.yml> compile_topology=... k=v ...`) with the
recipe's published settings and libtpu flags, dumping HLO with XLA_FLAGS, keeps only the train step's
after-optimizations module and writes

    <cache>/maxtext/<recipe>/train_step.after_optimizations.txt
    <cache>/maxtext/<recipe>/meta.json     (topology, devices, settings, versions, compile seconds, peak RSS)

<cache> is $POLYCHIP_CACHE_DIR or ~/.cache/polychip. A recipe whose meta.json exists is skipped; a compile
is stopped once the optimised HLO is dumped (--full: run to the end); one whose process tree passes
--max-rss-gib is killed and recorded as such (status "aborted_rss") so the next
run does not retry it unless --retry-failed.

    /work/maxtext-venv/bin/python bench/maxtext/compile_recipes.py [--recipes FILE] [--only NAME ...] [--list]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
HLO_NAME = "train_step.after_optimizations.txt"


def cache_root() -> Path:
    env = os.environ.get("POLYCHIP_CACHE_DIR")
    return (Path(env) if env else Path.home() / ".cache" / "polychip") / "maxtext"


def load_recipes(path: Path = HERE / "recipes.yaml") -> tuple[dict, dict]:
    doc = yaml.safe_load(path.read_text())
    return doc["recipes"], doc.get("flag_groups", {})


def _versions() -> dict:
    from importlib.metadata import version
    return {p: version(p) for p in ("maxtext", "jax", "jaxlib", "libtpu")}


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (from /proc; 0 once gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            todo.extend(int(k) for k in kids)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def compile_args(name: str, r: dict, groups: dict, out_dir: Path) -> tuple[list[str], dict]:
    """The train_compile command line and environment for one recipe."""
    import maxtext
    base = Path(maxtext.__file__).parent / "configs" / "base.yml"
    over = {"model_name": r["model"], "compile_topology": r["topology"],
            "compile_topology_num_slices": r.get("num_slices", 1), "run_name": name,
            "base_output_directory": str(out_dir / "out"), "enable_checkpointing": False,
            "dataset_type": "synthetic", **r.get("overrides", {})}
    argv = [sys.executable, "-m", "maxtext.trainers.pre_train.train_compile", str(base)]
    argv += [f"{k}={v}" for k, v in over.items()]
    unknown = [g for g in r.get("xla_flag_groups", []) if g not in groups]
    if unknown:
        raise SystemExit(f"recipe {name}: unknown flag group(s) {unknown} (define them under flag_groups)")
    libtpu = " ".join(groups[g].strip() for g in r.get("xla_flag_groups", []))
    # ALLOW_MULTIPLE_LIBTPU_LOAD: a deviceless compile needs no exclusive hold on a TPU, and a killed compile
    # (or another engineer's) otherwise leaves /tmp/libtpu_lockfile that fails the next one.
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
               LIBTPU_INIT_ARGS=(os.environ.get("LIBTPU_INIT_ARGS", "") + " " + libtpu).strip(),
               XLA_FLAGS=f"--xla_dump_to={out_dir / 'dump'} --xla_dump_hlo_as_text "
                         "--xla_dump_hlo_module_re=.*train_step.*")
    return argv, env


def _hlo_ready(dump: Path, seen: dict) -> bool:
    """The train step's optimised module and its memory report are dumped and unchanged for 6 s."""
    files = list(dump.glob("*train_step*after_optimizations.txt"))
    files += list(dump.glob("*train_step*after_optimizations-memory-usage-report.txt"))
    if len(files) < 2:
        return False
    sizes = tuple(sorted((str(p), p.stat().st_size) for p in files))
    now = time.monotonic()
    if seen.get("sizes") != sizes:
        seen.update(sizes=sizes, since=now)
    return now - seen["since"] >= 6


def run_watched(argv: list[str], env: dict, log: Path, max_rss: int, timeout: float,
                stop_at_hlo: Path | None = None) -> dict:
    """Run argv, polling its process tree's RSS; kill it past max_rss bytes or timeout seconds, or (with
    stop_at_hlo, the dump folder) once the optimised HLO is dumped: XLA:TPU dumps it after its HLO passes
    and buffer assignment, then spends most of the compile on code generation this bench does not need."""
    t0, peak, status, seen, extra = time.monotonic(), 0, "ok", {}, {}
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            peak = max(peak, _tree_rss(proc.pid))
            hlo_done = stop_at_hlo is not None and _hlo_ready(stop_at_hlo, seen)
            if peak > max_rss or time.monotonic() - t0 > timeout or hlo_done:
                status = "ok" if hlo_done and peak <= max_rss else "aborted_rss" if peak > max_rss else "timeout"
                if hlo_done:
                    extra["stopped"] = "after the optimised HLO was dumped; backend code generation not run"
                os.killpg(proc.pid, 9)
                proc.wait()
                break
            time.sleep(2)
    if status == "ok" and proc.returncode not in (0, -9):
        status = f"failed rc={proc.returncode}"
    return {"status": status, "compile_seconds": round(time.monotonic() - t0, 1),
            "peak_rss_gib": round(peak / 2**30, 2), **extra}


def _pick_hlo(dump: Path) -> Path | None:
    """The train step's final module: the largest *after_optimizations.txt matching train_step."""
    cands = [p for p in dump.glob("*train_step*after_optimizations.txt")]
    return max(cands, key=lambda p: p.stat().st_size) if cands else None


_FLOPS_SNIPPET = """
import json, sys
from maxtext.configs import pyconfig
from maxtext.utils import maxtext_utils
cfg = pyconfig.initialize(sys.argv)  # ["-c", base.yml, k=v ...]: argv[0] stands for the program
total, weights, attn = maxtext_utils.calculate_tflops_training_per_device(cfg, log=False)
print("FLOPS_JSON " + json.dumps({"total": total, "weights": weights, "attention_causal": attn,
                                  "global_batch": cfg.global_batch_size_to_train_on}))
"""


def maxtext_flops(argv: list[str], env: dict) -> dict:
    """MaxText's own training FLOPs per device per step for this config (calculate_tflops_training_per_device,
    the convention of the TFLOP/s/device its logs print; attention counted causally since PR #1988).

    In a child process: pyconfig loads libtpu, and a parent holding libtpu would lock out the compiles."""
    out = subprocess.run([sys.executable, "-c", _FLOPS_SNIPPET, *argv[3:]], env=env, capture_output=True,
                         text=True, timeout=600)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("FLOPS_JSON ")), None)
    if line is None:
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1]}
    return {**json.loads(line[len("FLOPS_JSON "):]), "convention": "maxtext 0.2.4, causal attention"}


def compile_one(name: str, r: dict, groups: dict, args) -> dict:
    dest = cache_root() / name
    dest.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"maxtext-{name}-"))
    argv, env = compile_args(name, r, groups, work)
    print(f"[{name}] compiling for {r['topology']} x{r.get('num_slices', 1)} ...", flush=True)
    res = run_watched(argv, env, dest / "compile.log", int(args.max_rss_gib * 2**30), args.timeout,
                      None if args.full else work / "dump")
    hlo = _pick_hlo(work / "dump") if res["status"] == "ok" else None
    if res["status"] == "ok" and hlo is None:
        res["status"] = "no after_optimizations dump"
    if hlo is not None:
        shutil.copyfile(hlo, dest / HLO_NAME)
        report = hlo.with_name(hlo.name.replace(".txt", "-memory-usage-report.txt"))
        if report.exists():  # the buffer assignment's peak: does the step fit in HBM
            shutil.copyfile(report, dest / "memory-usage-report.txt")
            m = re.search(r"Total bytes: (\d+)", report.read_text())
            res["hbm_bytes"] = int(m.group(1)) if m else None
        res["hlo_module_file"] = hlo.name
    oom = re.search(r"RESOURCE_EXHAUSTED: (Ran out of memory[^\n]*)", (dest / "compile.log").read_text(errors="replace"))
    if oom:  # the HLO is dumped before the compiler gives up, but it is not a program that ran
        res["status"], res["oom"] = "hbm_oom", oom.group(1)
    shutil.rmtree(work, ignore_errors=True)
    meta = {"recipe": name, "model": r["model"], "chip": r["chip"], "topology": r["topology"],
            "num_slices": r.get("num_slices", 1), "n_devices": r["n_devices"] * r.get("num_slices", 1),
            "devices_per_slice": r["n_devices"], "per_device_batch_size": r["overrides"]["per_device_batch_size"],
            "seq": r["overrides"].get("max_target_length", 2048),
            "remat_policy": r["overrides"].get("remat_policy", "full"),
            "overrides": r.get("overrides", {}), "xla_flag_groups": r.get("xla_flag_groups", []),
            "maxtext_tflops_per_device": maxtext_flops(argv, env),
            "versions": _versions(), "compiled": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **res}
    _atomic_json(dest / "meta.json", meta)
    print(f"[{name}] {res['status']}: {res['compile_seconds']} s, peak RSS {res['peak_rss_gib']} GiB", flush=True)
    return meta


def backfill(name: str, r: dict, groups: dict, meta: dict, meta_p: Path) -> None:
    """Fill what an older version of this script did not record: MaxText's FLOPs, the HBM the step needs."""
    changed = False
    if "total" not in meta.get("maxtext_tflops_per_device", {}):
        argv, env = compile_args(name, r, groups, Path(tempfile.gettempdir()))
        meta["maxtext_tflops_per_device"], changed = maxtext_flops(argv, env), True
    report = meta_p.with_name("memory-usage-report.txt")
    if "hbm_bytes" not in meta and report.exists():
        m = re.search(r"Total bytes: (\d+)", report.read_text())
        meta["hbm_bytes"], changed = (int(m.group(1)) if m else None), True
    if changed:
        _atomic_json(meta_p, meta)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="recipe names (default: all, smallest first)")
    ap.add_argument("--recipes", type=Path, default=HERE / "recipes.yaml",
                    help="recipe file (default: the published recipes; moe_compare.yaml: like-for-like MoE configs)")
    ap.add_argument("--list", action="store_true", help="list recipes and cache state, compile nothing")
    ap.add_argument("--retry-failed", action="store_true", help="recompile recipes recorded as failed")
    ap.add_argument("--max-rss-gib", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per compile")
    ap.add_argument("--full", action="store_true",
                    help="let each compile run to the end (code generation) instead of stopping at the HLO")
    args = ap.parse_args(argv)
    if not args.recipes.is_file():
        print(f"--recipes {args.recipes}: no such file", file=sys.stderr)
        return 2
    recipes, groups = load_recipes(args.recipes)
    names = args.only or sorted(recipes, key=lambda n: recipes[n].get("compile_order", 99))
    missing = [n for n in names if n not in recipes]
    if missing:
        print(f"unknown recipe(s): {', '.join(missing)}; known: {', '.join(recipes)}", file=sys.stderr)
        return 2
    for n in names:
        meta_p = cache_root() / n / "meta.json"
        meta = json.loads(meta_p.read_text()) if meta_p.exists() else None
        if args.list:
            print(f"{n:40s} {meta['status'] if meta else 'not compiled'}")
            continue
        if meta and (meta["status"] == "ok" or not args.retry_failed):
            print(f"[{n}] cached ({meta['status']})")
            backfill(n, recipes[n], groups, meta, meta_p)
            continue
        compile_one(n, recipes[n], groups, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""bench/gpu_suite.sh's results -> planner records (`polychip plan --records DIR`), and its summary table.

    python bench/gpu_records.py device OUT/device.json      # what this process sees (platform, kind, chip)
    python bench/gpu_records.py convert OUT                 # OUT/train_*.json, OUT/serve.json -> OUT/records/
    python bench/gpu_records.py summary OUT                 # one table over every part's JSON

Every record is `source: measured` and names the chip by the catalog's device-kind mapping
(hardware.catalog.chip_for_device_kind; "cpu" for the host CPU), plus the raw `device_kind` it was
measured on. A device kind the catalog does not know gets no record: the planner could not place it.
Each record is parsed back with plan.records.parse_record before it is written, so a record the
planner would refuse is an error here, not at plan time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

REF = "bench/gpu_suite.sh"


def chip_name(platform: str, device_kind: str) -> str | None:
    """The catalog name for a JAX device (None: not in the catalog)."""
    if platform == "cpu":
        return "cpu"
    from polychip.hardware.catalog import chip_for_device_kind

    chip = chip_for_device_kind(device_kind)
    return None if chip is None else chip.name


def device_info() -> dict:
    import jax

    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": d.device_kind, "devices": jax.device_count(),
            "chip": chip_name(d.platform, d.device_kind), "jax": jax.__version__}


def _today() -> str:
    return datetime.date.today().isoformat()


def train_records(rows: list[dict], remat: str) -> list[dict]:
    """One record per bench/train_step.py row (its --json output)."""
    out = []
    for r in rows:
        chip = chip_name(r["platform"], r["device_kind"])
        if chip is None:
            print(f"no record for {r['preset']}: device kind {r['device_kind']!r} is not in the chip catalog")
            continue
        mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        rec = {"chip": chip, "model": r["preset"], "mode": "train", "chips": r["devices"],
               "batch": r["batch_size"], "seq": r["seq_len"], "step_time_s": r["step_time_median_s"],
               "remat": remat, "grad_accum": 1, "dtype": r["compute_dtype"], "source": "measured",
               "device_kind": r["device_kind"], "ref": REF, "date": _today(),
               "notes": (f"measured: median of {len(r['step_times_s'])} steps after warm-up on "
                         f"{r['devices']} x {r['device_kind']}; MFU {mfu} vs {_peak_label(r)}")}
        if r["devices"] == 1:  # one device: the layout is known; on several, the mesh was train_step's default
            rec["layout"] = {"data": 1, "fsdp": 1, "tensor": 1, "stage": 1, "context": 1, "nodes": 1}
        out.append(rec)
    return out


def serve_records(res: dict, device: dict) -> list[dict]:
    """One record per concurrency level of bench/serve.py's --json output (one replica on one device)."""
    chip = device["chip"]
    if chip is None:
        print(f"no serve records: device kind {device['device_kind']!r} is not in the chip catalog")
        return []
    args = res["args"]
    out = []
    for level, r in _serve_levels(res):
        rps = r["request_throughput"]
        prompt = (r["total_token_throughput"] - r["output_token_throughput"]) / rps
        output = r["output_token_throughput"] / rps
        out.append({"chip": chip, "model": args["preset"], "mode": "serve", "chips": 1,
                    "batch": min(level, args["max_batch"], args["num_prompts"]), "prompt_tokens": max(1, round(prompt)),
                    "output_tokens": max(1, round(output)), "requests_per_s": rps, "dtype": args["dtype"],
                    "source": "measured", "device_kind": device["device_kind"], "ref": REF, "date": _today(),
                    "notes": (f"measured: bench/serve.py, {level} requests in flight, {r['completed']} requests, "
                              f"{args['dataset']} lengths, on 1 x {device['device_kind']}; "
                              f"{r['output_token_throughput']:.1f} output tok/s")})
    return out


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def convert(out: Path) -> list[Path]:
    """Write out/records/*.json from the parts' JSON that exist; returns the files written."""
    from polychip.plan.records import parse_record, write_record

    device = _load(out / "device.json")
    if device is None:
        raise SystemExit(f"{out / 'device.json'} missing: run `gpu_records.py device` first")
    recs: dict[str, dict] = {}
    for path in sorted(out.glob("train_*.json")):
        meta = _load(path.with_suffix(".meta"))  # the remat the suite ran with (train_step.py does not echo it)
        for rec in train_records(_load(path), (meta or {}).get("remat", "none")):
            recs[f"train_{rec['model']}"] = rec
    serve = _load(out / "serve.json")
    if serve is not None:
        for rec in serve_records(serve, device):
            recs[f"serve_{rec['model']}_b{rec['batch']}"] = rec
    written = []
    for name, rec in recs.items():
        parse_record(rec, name)
        path = out / "records" / f"{name}.json"
        write_record(rec, path)
        written.append(path)
    return written


def _fmt(v, width: int, prec: int) -> str:
    return f"{'n/a':>{width}}" if v is None else f"{v:>{width}.{prec}f}"


def _peak_label(r: dict) -> str:
    return "this CPU's measured matmul rate" if r["platform"] == "cpu" else f"the catalog peak of {r['peak_source']}"


def _serve_levels(res: dict) -> list[tuple[int, dict]]:
    """(requests in flight, result) per level of bench/serve.py's JSON, fewest in flight first."""
    last = int(str(res["args"]["max_concurrency"]).split(",")[-1])
    out = [(last if k == "serve" else int(k.rsplit("_", 1)[1]), r) for k, r in res.items()
           if k.startswith("serve") and isinstance(r, dict) and r.get("completed")]
    return sorted(out, key=lambda x: x[0])


def planner_estimate(r: dict, remat: str) -> float | None:
    """`polychip plan`'s estimated step time (published records only, not this run's) for a train row."""
    from polychip.config import MODEL_PRESETS
    from polychip.hardware import load_catalog
    from polychip.plan import TrainWorkload
    from polychip.plan.perf import PerfModel
    from polychip.plan.published import published_records

    chip = chip_name(r["platform"], r["device_kind"])
    cat = load_catalog()
    if chip not in cat or r["preset"] not in MODEL_PRESETS:
        return None
    w = TrainWorkload("w", MODEL_PRESETS[r["preset"]], r["preset"], 1e9, r["seq_len"], r["batch_size"], remat=remat)
    est = PerfModel(published_records(), cat).train(w, cat[chip], r["devices"])
    return None if est is None else est.step_time_s


def summary(out: Path) -> str:
    """A plain-text table of every part that left JSON under `out`; parts that did not are named."""
    lines = []
    device = _load(out / "device.json") or {}
    lines.append(f"device: {device.get('devices', '?')} x {device.get('device_kind', '?')} "
                 f"(catalog chip {device.get('chip')}), jax {device.get('jax', '?')}")
    lines.append("figures measured in this run, except the estimated \"plan est.\" column")
    lines.append("")
    lines.append(f"{'train':<10}{'batch x seq':>14}{'remat':>7}{'step ms':>10}{'tok/s':>12}{'TFLOP/s':>9}{'MFU':>8}"
                 f"{'plan est. ms':>14}")
    trains = sorted(out.glob("train_*.json"))
    for path in trains:
        meta = _load(path.with_suffix(".meta")) or {}
        for r in _load(path):
            mfu = None if r.get("mfu") is None else 100 * r["mfu"]
            est = planner_estimate(r, meta.get("remat", "none"))
            lines.append(f"{r['preset']:<10}{r['batch_size']:>7} x {r['seq_len']:<5}{meta.get('remat', 'none'):>6}"
                         f"{r['step_time_median_s'] * 1e3:>10.1f}{r['tokens_per_s']:>12,.0f}"
                         f"{r['model_tflops_per_s_per_device']:>9.1f}{_fmt(mfu, 7, 1)}%"
                         f"{_fmt(None if est is None else est * 1e3, 14, 1)}  (MFU vs {_peak_label(r)})")
    if trains:
        lines.append("  plan est.: `polychip plan`'s estimate from published records only (not this run), for comparison")
    if not trains:
        lines.append("  (no train results)")
    att = _load(out / "attention.json")
    lines.append("")
    lines.append(f"{'attention':<10}{'seq':>6} {'pass':<8}" + "".join(f"{n:>10}" for n in ("pallas", "cudnn", "xla"))
                 + "   TFLOP/s; parity: max rel err vs fp32 reference")
    for r in (att or {}).get("rows", []):
        cells = "".join(_fmt(r["tflops"].get(n), 10, 2) for n in ("pallas", "cudnn", "xla"))
        par = ", ".join(f"{n} {v:.1e}" for n, v in r.get("parity", {}).items())
        lines.append(f"{'':<10}{r['seq']:>6} {r['pass']:<8}{cells}   {par}")
    for note in (att or {}).get("notes", []):
        lines.append(f"  note: {note}")
    if att is None:
        lines.append("  (no attention results)")
    serve = _load(out / "serve.json")
    lines.append("")
    lines.append(f"{'serve':<10}{'in flight':>10}{'req/s':>9}{'out tok/s':>11}{'TTFT p50 ms':>13}{'TPOT p50 ms':>13}")
    for level, r in _serve_levels(serve or {"args": {"max_concurrency": "0"}}):
        lines.append(f"{'':<10}{level:>10}{r['request_throughput']:>9.2f}{r['output_token_throughput']:>11.1f}"
                         f"{r['ttft_ms']['p50']:>13.1f}{r['tpot_ms']['p50']:>13.2f}")
    if serve is None:
        lines.append("  (no serving results)")
    recs = sorted((out / "records").glob("*.json")) if (out / "records").is_dir() else []
    lines.append("")
    lines.append(f"planner records (measured): {len(recs)} in {out / 'records'}  ->  polychip plan FLEET --records "
                 f"{out / 'records'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["device", "convert", "summary"])
    ap.add_argument("path", help="device: the JSON file to write; convert/summary: the suite's output folder")
    args = ap.parse_args(argv)
    if args.what == "device":
        from polychip.files import atomic_write_json

        info = device_info()
        atomic_write_json(args.path, info)
        print(f"device: {info['devices']} x {info['device_kind']} ({info['platform']}), catalog chip {info['chip']}")
    elif args.what == "convert":
        from polychip.plan.errors import PlanError

        try:
            written = convert(Path(args.path))
        except PlanError as e:
            print(f"gpu_records: {e}", file=sys.stderr)
            return 2
        print(f"{len(written)} measured record(s) written under {Path(args.path) / 'records'}")
    else:
        print(summary(Path(args.path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""bench/gpu_suite.sh and bench/gpu_records.py: the suite's results become planner records the planner uses.

The full smoke run (every part on CPU, tiny preset) takes ~1.5 minutes on a loaded 2-core machine: heavy.
The converter is tested without it, on part outputs shaped like bench/train_step.py's and bench/serve.py's.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from polychip.config import MODEL_PRESETS
from polychip.hardware import load_catalog
from polychip.plan import TrainWorkload, load_records
from polychip.plan.perf import PerfModel

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "gpu_suite.sh"


def _gpu_records():
    spec = importlib.util.spec_from_file_location("gpu_records", ROOT / "bench" / "gpu_records.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _train_row(preset: str, kind: str, step: float, platform: str = "gpu") -> dict:
    # the fields of polychip.train.bench.bench_train's result that the converter and summary read
    return {"preset": preset, "platform": platform, "device_kind": kind, "devices": 1, "batch_size": 16,
            "seq_len": 2048, "compute_dtype": "bfloat16", "step_time_median_s": step, "step_times_s": [step] * 10,
            "tokens_per_s": 16 * 2048 / step, "model_tflops_per_s_per_device": 300.0, "mfu": 0.3,
            "peak_source": "h200"}


def _serve_json() -> dict:
    def level(rps):
        return {"completed": 64, "failed": 0, "request_throughput": rps, "output_token_throughput": rps * 64,
                "total_token_throughput": rps * (64 + 256), "ttft_ms": {"p50": 20.0}, "tpot_ms": {"p50": 5.0}}

    return {"serve_concurrency_1": level(2.0), "serve_concurrency_16": level(20.0), "serve": level(50.0),
            "args": {"preset": "1b", "dtype": "bfloat16", "max_concurrency": "1,16,64", "max_batch": 64,
                     "num_prompts": 64, "dataset": "fixed"}}


def _write(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))


def test_records_are_measured_on_the_catalog_chip_and_the_planner_uses_them(tmp_path, capsys):
    gr = _gpu_records()
    _write(tmp_path / "device.json", {"platform": "gpu", "device_kind": "NVIDIA H200", "devices": 1, "chip": "h200"})
    _write(tmp_path / "train_125m.json", [_train_row("125m", "NVIDIA H200", 0.08)])
    _write(tmp_path / "train_125m.meta", {"remat": "none"})
    _write(tmp_path / "train_1b.json", [_train_row("1b", "NVIDIA H200", 0.5)])
    _write(tmp_path / "train_1b.meta", {"remat": "full"})
    # a device kind the catalog does not know: no record (the planner could not place it)
    _write(tmp_path / "train_small.json", [_train_row("small", "Some Future GPU", 0.01)])
    _write(tmp_path / "serve.json", _serve_json())
    written = gr.convert(tmp_path)
    assert "no record for small" in capsys.readouterr().out
    assert sorted(p.name for p in written) == ["serve_1b_b1.json", "serve_1b_b16.json", "serve_1b_b64.json",
                                               "train_125m.json", "train_1b.json"]
    raw = [json.loads(p.read_text()) for p in written]
    assert all(r["source"] == "measured" and r["device_kind"] == "NVIDIA H200" and "measured" in r["notes"]
               for r in raw)
    recs = load_records(tmp_path / "records")
    assert {r.chip for r in recs} == {"h200"} and {r.source for r in recs} == {"measured"}
    train = {r.model_name: r for r in recs if r.mode == "train"}
    assert train["125m"].step_time_s == 0.08 and train["1b"].remat == "full" and train["1b"].batch == 16
    serve = sorted((r for r in recs if r.mode == "serve"), key=lambda r: r.batch)
    assert [(r.batch, r.prompt_tokens, r.output_tokens, r.requests_per_s) for r in serve] == [
        (1, 256, 64, 2.0), (16, 256, 64, 20.0), (64, 256, 64, 50.0)]
    # the planner takes the measured step time for the configuration it was measured on
    cat = load_catalog()
    w = TrainWorkload("w", MODEL_PRESETS["125m"], "125m", 1e9, 2048, 16, remat="none")
    est = PerfModel(recs, cat).train(w, cat["h200"], 1)
    assert est.source == "measured" and est.step_time_s == pytest.approx(0.08)
    text = gr.summary(tmp_path)
    assert "NVIDIA H200" in text and "5 in" in text and "MFU vs the catalog peak of h200" in text
    assert "plan est." in text


def test_convert_needs_the_device_file(tmp_path):
    with pytest.raises(SystemExit, match="device.json missing"):
        _gpu_records().convert(tmp_path)


def test_bad_argument_is_one_line_and_exit_2():
    p = subprocess.run(["bash", str(SUITE), "--bogus"], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "unknown argument --bogus" in p.stderr


@pytest.mark.heavy
def test_smoke_run_writes_every_part_and_loadable_measured_records(tmp_path):
    out = tmp_path / "suite"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_SUITE_BUDGET_S": "400"}
    env.pop("OUT", None)
    # one device, as on a one-GPU machine (conftest forces 8 host devices for the rest of the suite)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    p = subprocess.run(["bash", str(SUITE), "--smoke", "--no-setup", "--out", str(out), "--tar",
                        str(tmp_path / "suite.tgz")], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for name in ("device.json", "train_tiny.json", "serve.json", "attention.json", "summary.txt"):
        assert (out / name).is_file(), name
    assert (tmp_path / "suite.tgz").stat().st_size > 0
    device = json.loads((out / "device.json").read_text())
    assert device["platform"] == "cpu" and device["chip"] == "cpu" and device["devices"] == 1
    recs = load_records(out / "records")
    assert {(r.mode, r.model_name) for r in recs} == {("train", "tiny"), ("serve", "tiny")}
    assert sorted(r.batch for r in recs if r.mode == "serve") == [1, 4]
    for path in (out / "records").glob("*.json"):
        raw = json.loads(path.read_text())
        assert raw["source"] == "measured" and raw["chip"] == "cpu" and raw["device_kind"] == device["device_kind"]
    att = json.loads((out / "attention.json").read_text())
    assert any("cuDNN skipped" in n for n in att["notes"])
    assert att["parity"] and all(e < 2e-2 for e in att["parity"].values())
    assert "cuDNN skipped" in p.stdout
    summary = (out / "summary.txt").read_text()
    assert "figures measured in this run" in summary and "attention (smoke): ok" in summary

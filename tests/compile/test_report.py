"""compile/report.py on hand-made compile results (no compiler): every figure against its own formula."""
import pytest

from polychip.compile.lower import CompiledStep
from polychip.compile.report import modelled_reports, step_report
from polychip.compile.target import parse_target
from polychip.config import build_config
from polychip.model import flops as F

GB = 1e9


def _step(**kw) -> CompiledStep:
    d = dict(name="train", memory={"argument": 3 * GB, "output": 2 * GB, "alias": 2 * GB, "temp": 4 * GB,
                                   "generated_code": 1e6},
             cost={"flops": 1e12, "optimal_seconds": -1.0, "bytes accessed": 5e9},
             hlo={"loops": [["body", 2], ["body2", 2]], "collective_bytes": {"all-gather": 8e9, "all-reduce": 4e9},
                  "hbm_traffic_bytes": 40e9},
             program_flops=4e15, program_flops_loops_once=2e15, lower_s=1.0, compile_s=2.0)
    d.update(kw)
    return CompiledStep(**d)


def _values(rep):
    return {k: f["value"] for k, f in rep.figures.items()}


def test_step_report_figures_follow_their_formulas():
    cfg, spec = build_config("tiny"), parse_target("v5e:2x2")  # 4 chips, 1 device each: 197 TFLOP/s, 819 GB/s
    c = _step(kernel_fallback="swapped kernels", dropped_rules=["a", "b", "c", "d"])
    r = step_report(c, cfg, spec, batch=8, seq=64, dtype="bfloat16")
    v = _values(r)
    used = (3 + 2 - 2 + 4) * GB + 1e6
    assert v["hbm_used_per_device"] == used == v["hbm_used_per_chip"]
    assert r.fits is True and v["hbm_margin_per_device"] == 16 * GB - used
    t_c, t_m, t_n = 4e15 / 4 / 197e12, 40e9 / 819e9, 12e9 / 400e9
    assert (v["t_compute"], v["t_hbm"], v["t_collectives"]) == pytest.approx((t_c, t_m, t_n))
    assert v["step_time"] == max(t_c, t_m, t_n)
    assert r.figures["step_time"]["note"].startswith("compute-bound")
    mf = F.train_flops_per_step(cfg.model, 8, 64)
    assert v["model_flops"] == mf
    assert v["mfu"] == pytest.approx(mf / (v["step_time"] * 4 * 197e12))
    assert v["tokens_per_s_per_chip"] == pytest.approx(8 * 64 / v["step_time"] / 4)
    assert v["program_flops_loops_once_per_device"] == 2e15 / 4
    assert r.figures["compiler_optimal_seconds"]["note"] == "invalid (negative)"
    assert v["compile_time"] == 3.0
    assert r.notes == ["swapped kernels", "4 sharding rule(s) dropped (axis does not divide): a; b; c",
                       "compiled loops with trip counts 2, 2: XLA's cost_analysis counts each body once"]


def test_two_devices_per_chip_split_hbm_and_peak():
    cfg, spec = build_config("tiny"), parse_target("tpu7x:2x2x1")  # 4 chips, 8 devices
    v = _values(step_report(_step(), cfg, spec, batch=8, seq=64, dtype="bfloat16"))
    assert v["hbm_used_per_chip"] == 2 * v["hbm_used_per_device"]
    assert v["hbm_per_device"] == spec.chip.hbm_bytes / 2
    assert v["t_compute"] == pytest.approx(4e15 / 8 / (spec.chip.peak("bfloat16") / 2))
    assert v["mfu"] == pytest.approx(v["model_flops"] / (v["step_time"] * 4 * spec.chip.peak("bfloat16")))


def test_refused_compile_reports_a_lower_bound_and_no_step_time():
    cfg, spec = build_config("tiny"), parse_target("v5e:2x2")
    c = _step(memory={"argument": 10 * GB, "temp": 20 * GB, "compiler_available_hbm": 15.75 * GB}, cost={},
              hlo={"loops": [], "collective_bytes": {}, "hbm_traffic_bytes": 0.0}, oom="out of HBM",
              kernel_fallback="never shown for a refused compile")
    r = step_report(c, cfg, spec, batch=8, seq=64, dtype="bfloat16")
    v = _values(r)
    assert v["hbm_used_per_device"] == 30 * GB and r.fits is False
    assert "step_time" not in v and "mfu" not in v and "hbm_traffic_per_device" not in v
    assert r.figures["compile_time"]["note"] == "until the compiler refused"
    assert r.notes == ["the TPU compiler refused: out of HBM"]


def test_modelled_mfu_uses_the_one_formula():
    cfg, spec = build_config("125m"), parse_target("h100:8")
    for mode in ("train", "serve"):
        for r in modelled_reports(cfg, spec, mode, batch=16, seq=512, dtype="bfloat16", output_tokens=64):
            v = _values(r)
            assert v["mfu"] == F.mfu(v["model_flops"], v["step_time"], 8, spec.chip.peak("bfloat16"))
            assert 0 < v["mfu"] <= 1.0

"""compile/report.py on hand-made compile results (no compiler): every figure against its own formula."""
import dataclasses

import pytest

from polychip.compile.lower import CompiledStep
from polychip.compile.report import modelled_reports, step_report
from polychip.compile.target import parse_target
from polychip.config import build_config
from polychip.estimate import INTER, INTRA, Op
from polychip.model import flops as F

GB = 1e9


# Per device, as estimate.hlo would produce them for a 4-device program doing 4e15 FLOPs in all: one
# compute-bound op run twice, one HBM-bound op, a Pallas kernel, and collectives within the slice.
OPS = [dataclasses.asdict(o) for o in (
    Op("dot.1 (mlp/dot_general)", flops=4e14, bytes=10e9, count=2.0),
    Op("copy.2", bytes=20e9),
    Op("flash.3 (flash/pallas_call)", flops=2e14, bytes=1e9, source="declared"),
    Op("ag.4", kind="collective", bytes=8e9, link=INTRA, collective="all-gather"),
    Op("ar.5", kind="collective", bytes=4e9, link=INTRA, collective="all-reduce"),
)]


def _step(**kw) -> CompiledStep:
    d = dict(name="train", memory={"argument": 3 * GB, "output": 2 * GB, "alias": 2 * GB, "temp": 4 * GB,
                                   "generated_code": 1e6},
             cost={"flops": 1e12, "optimal_seconds": -1.0, "bytes accessed": 5e9},
             hlo={"loops": [["body", 2], ["body2", 2]], "collective_bytes": {"all-gather": 8e9, "all-reduce": 4e9},
                  "hbm_traffic_bytes": 40e9, "ops": OPS},
             program_flops=4e15, program_flops_loops_once=2e15, lower_s=1.0, compile_s=2.0)
    d.update(kw)
    return CompiledStep(**d)


@pytest.fixture(autouse=True)
def uncalibrated(monkeypatch):
    """The hand computations assume the uncalibrated roofline (a test that wants a fit sets its own)."""
    from polychip.compile import report as R
    from polychip.estimate import Calibration

    monkeypatch.setattr(R, "calibration_for", lambda family: Calibration())


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
    # v5e per device: 197 TFLOP/s, 819 GB/s, 400 GB/s ICI; uncalibrated: no overlap, no band.
    t_dot = 2 * max(4e14 / 197e12, 10e9 / 819e9)  # compute-bound, x 2 runs
    t_copy = 20e9 / 819e9  # HBM-bound
    t_flash = max(2e14 / 197e12, 1e9 / 819e9)  # compute-bound, at its declared cost
    t_coll = 12e9 / 400e9
    assert (v["t_compute"], v["t_hbm"], v["t_collectives"]) == pytest.approx((t_dot + t_flash, t_copy, t_coll))
    assert v["t_exposed_collectives"] == pytest.approx(t_coll)
    assert v["step_time"] == pytest.approx(t_dot + t_copy + t_flash + t_coll)
    assert r.figures["step_time"]["note"] == "compute-bound, sum over ops (uncalibrated: no error band)"
    assert v["estimate_flops_per_device"] == 1e15 and v["declared_flops_per_device"] == 2e14
    mf = F.train_flops_per_step(cfg.model, 8, 64)
    assert v["model_flops"] == mf
    # uncalibrated: the MFU is printed only as an upper bound, from the ops with collectives hidden
    assert r.figures["mfu"]["upper_bound"] is True and "range" not in r.figures["mfu"]
    assert v["mfu"] == pytest.approx(mf / ((t_dot + t_copy + t_flash) * 4 * 197e12))
    assert v["tokens_per_s_per_chip"] == pytest.approx(8 * 64 / v["step_time"] / 4)
    assert v["top_ops"][0] == ["dot.1 (mlp/dot_general)", pytest.approx(t_dot)]
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
    peak = spec.chip.peak("bfloat16") / 2  # per device
    assert v["t_compute"] == pytest.approx(2 * 4e14 / peak + 2e14 / peak)
    assert v["mfu"] == pytest.approx(v["model_flops"] / (v["t_ops"] * 4 * spec.chip.peak("bfloat16")))


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


def test_calibrated_estimate_prints_its_band_as_an_mfu_range(monkeypatch):
    from polychip.compile import report as R
    from polychip.estimate import Calibration

    cal = Calibration(compute_efficiency=0.5, memory_efficiency=1.0, link_efficiency=1.0, overlap=1.0, band=0.1,
                      source="test fit")
    monkeypatch.setattr(R, "calibration_for", lambda family: cal)
    cfg, spec = build_config("tiny"), parse_target("v5e:2x2")
    r = step_report(_step(), cfg, spec, batch=8, seq=64, dtype="bfloat16")
    v = _values(r)
    # half the peak doubles the compute-bound ops; full overlap hides all 30 ms of collectives under them
    t = 2 * (2 * 4e14 / 197e12 + 2e14 / 197e12) + 20e9 / 819e9
    assert v["step_time"] == pytest.approx(t) and v["t_exposed_collectives"] == 0.0
    mfu = F.train_flops_per_step(cfg.model, 8, 64) / (t * 4 * 197e12)
    assert v["mfu"] == pytest.approx(mfu)
    assert r.figures["mfu"]["range"] == pytest.approx([0.9 * mfu, 1.1 * mfu])
    assert "validated error band +/-10%" in r.figures["step_time"]["note"]


def test_no_mfu_above_100_percent_is_printed():
    from polychip.compile.report import mfu_figure

    f, note = mfu_figure(mf=3e15, t_step=1.0, t_optimistic=1.0, chips=1, peak=1e15, band=None)
    assert f["value"] == 1.0 and note.startswith("MFU clamped to 100% (computed 300%)")
    f, note = mfu_figure(mf=0.95e15, t_step=1.0, t_optimistic=1.0, chips=1, peak=1e15, band=0.1)
    assert f["range"] == pytest.approx([0.855, 1.0]) and "computed 104%" in note
    f, note = mfu_figure(mf=0.5e15, t_step=1.0, t_optimistic=0.8, chips=1, peak=1e15, band=None)
    assert f["value"] == pytest.approx(0.625) and note == "" and "50.0% with them exposed" in f["note"]


def test_collectives_on_a_link_without_bandwidth_are_named_not_costed(monkeypatch):
    from polychip.compile import report as R

    real = R.machine
    monkeypatch.setattr(R, "machine", lambda chip, dtype: dataclasses.replace(real(chip, dtype), inter_bandwidth=None))
    cfg, spec = build_config("tiny"), parse_target("v5e:2x2")
    ops = OPS + [dataclasses.asdict(Op("ag.9", kind="collective", bytes=5e9, link=INTER, collective="all-gather"))]
    hlo = {"loops": [], "collective_bytes": {"all-gather": 13e9, "all-reduce": 4e9}, "hbm_traffic_bytes": 31e9,
           "ops": ops}
    r = step_report(_step(hlo=hlo), cfg, spec, batch=8, seq=64, dtype="bfloat16")
    assert r.figures["t_collectives"]["value"] == pytest.approx(12e9 / 400e9)  # the INTER 5 GB is left out
    assert any(n.startswith("5.00 GB of transfers across slices (DCN) not costed") for n in r.notes)


def test_printed_report_labels_the_estimate_and_bounds_the_mfu():
    import io

    from rich.console import Console

    from polychip.compile.display import print_report
    from polychip.compile.report import build

    cfg, spec = build_config("tiny"), parse_target("v5e:2x2")
    r = step_report(_step(), cfg, spec, batch=8, seq=64, dtype="bfloat16")
    buf = io.StringIO()
    print_report(build(cfg, "tiny", spec, {"data": 1, "fsdp": 4, "tensor": 1}, "train", 8, 64, [r]),
                 Console(file=buf, width=250))
    out = buf.getvalue()
    assert "est. MFU" in out and "(upper bound)" in out and "uncalibrated: no error band" in out
    assert "compiler optimal_seconds" in out
    assert "top ops (estimate, per step): dot.1 (mlp/dot_general)" in out

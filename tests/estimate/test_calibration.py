"""The calibration fit on synthetic (program, time) pairs made with known efficiencies."""
import json

import numpy as np
import pytest

from polychip.estimate import calibration as C
from polychip.estimate.ops import HOST, INTRA, Calibration, Machine, Op, estimate_step

M = Machine(peak_flops=1e12, hbm_bandwidth=1e11, intra_bandwidth=1e10, inter_bandwidth=None, name="toy")
TRUE = Calibration(compute_efficiency=0.6, memory_efficiency=0.8, link_efficiency=0.5, overlap=0.4)
SMALL_GRID = {"compute_efficiency": (0.4, 0.5, 0.6, 0.7, 1.0), "memory_efficiency": (0.6, 0.7, 0.8, 0.9, 1.0),
              "link_efficiency": (0.3, 0.4, 0.5, 0.6, 1.0), "overlap": (0.0, 0.2, 0.4, 0.6, 0.8)}


def _ops(flops, bytes_, coll):
    """One compute-bound op, one memory-bound op (x3 loop) and one all-gather, at the given sizes."""
    return [Op("dot", flops=flops, bytes=flops / 1e4), Op("copy", flops=0.0, bytes=bytes_, count=3),
            Op("ag", kind="collective", bytes=coll, link=INTRA, collective="all-gather")]


# Mixes that separate the four parameters: compute-only, memory-only, and collective-heavy at two different
# compute sizes (exposed = coll / link_eff - overlap x compute: two ratios pin both unknowns).
MIXES = [(1e12, 0, 0), (0, 1e11, 0), (1e11, 1e9, 2e10), (3e11, 1e9, 2e10), (2e11, 5e10, 5e9)]


def _pairs(cal=TRUE, mixes=MIXES):
    out = []
    for i, mix in enumerate(mixes):
        ops = _ops(*mix)
        out.append(C.pair_from_ops(f"p{i}", ops, M, estimate_step(ops, M, cal).t_step))
    return out


def test_predict_is_estimate_step():
    rng = np.random.default_rng(0)
    for _ in range(20):
        ops = _ops(*(rng.uniform(0, 1, 3) * [1e12, 1e11, 1e10]))
        cal = Calibration(*rng.uniform(0.3, 1.0, 3), overlap=float(rng.uniform(0, 1)))
        assert C.predict(C.pair_from_ops("x", ops, M, 1.0), cal) == pytest.approx(estimate_step(ops, M, cal).t_step)


def test_fit_recovers_known_efficiencies():
    cal = C.fit(_pairs(), SMALL_GRID)
    assert (cal.compute_efficiency, cal.memory_efficiency, cal.link_efficiency, cal.overlap) == (0.6, 0.8, 0.5, 0.4)
    assert "5 pairs" in cal.source


def test_uncalibrated_roofline_is_off_by_the_efficiencies():
    p = _pairs()[0]  # compute-only: measured at 60% of peak, so the roofline predicts 1/0.6 too high an MFU
    assert C.rel_error(p.measured, C.predict(p, Calibration())) == pytest.approx(1 / 0.6 - 1)


def test_rel_error_is_mfu_error():
    # measured 2 s, predicted 1 s: predicted MFU is twice the measured one, +100%
    assert C.rel_error(2.0, 1.0) == 1.0
    assert C.rel_error(1.0, 2.0) == -0.5


def test_leave_one_out_fits_without_the_pair_left_out():
    pairs = _pairs()
    bad = C.Pair("odd", pairs[0].tf, pairs[0].tm, pairs[0].t_coll, pairs[0].measured * 1.5)
    pairs = pairs + [bad]
    loo = C.leave_one_out(pairs, SMALL_GRID)
    assert len(loo) == len(pairs)
    cal_odd, err_odd = loo[-1]
    # fitted on the five consistent pairs only: the true calibration, and the odd pair is 50% slow under it
    assert (cal_odd.compute_efficiency, cal_odd.memory_efficiency) == (0.6, 0.8)
    assert "odd" not in cal_odd.source
    assert err_odd == pytest.approx(0.5)
    for (cal, err), p in zip(loo, pairs):
        assert p.name not in cal.source.split(": ")[1].split(", ")
        assert err == pytest.approx(C.rel_error(p.measured, C.predict(p, cal)))


def test_band_is_leave_one_out_median():
    pairs = _pairs()
    pairs = pairs + [C.Pair("odd", pairs[1].tf, pairs[1].tm, pairs[1].t_coll, pairs[1].measured * 0.7)]
    cal, loo = C.calibrate(pairs, SMALL_GRID)
    assert cal.band == pytest.approx(float(np.median([abs(e) for _, e in loo])))
    assert cal.band is not None and cal.band >= 0


def test_median_objective_ignores_one_outlier():
    pairs = _pairs()
    pairs[0] = C.Pair("p0", pairs[0].tf, pairs[0].tm, pairs[0].t_coll, pairs[0].measured * 3)
    cal = C.fit(pairs, SMALL_GRID)
    assert cal.memory_efficiency == 0.8 and cal.link_efficiency == 0.5


def test_store_and_calibration_for(tmp_path):
    path = tmp_path / "cal.json"
    assert C.calibration_for("tpu", path) == Calibration()  # nothing stored: the uncalibrated roofline
    cal = Calibration(0.5, 0.7, 0.6, 0.3, band=0.08, source="test")
    C.store("tpu", cal, {"pairs": ["a"]}, path)
    assert C.calibration_for("tpu", path) == cal
    assert C.calibration_for("gpu", path) == Calibration()
    assert json.loads(path.read_text())["tpu"]["record"] == {"pairs": ["a"]}


def test_fit_needs_pairs():
    with pytest.raises(ValueError):
        C.fit([], SMALL_GRID)
    with pytest.raises(ValueError):
        C.calibrate(_pairs()[:1], SMALL_GRID)


def test_predict_prices_host_transfers_like_estimate_step():
    """Host copies out and back share a full-duplex link: the busier direction sets its time, in the
    calibration's arithmetic as in estimate_step (and concurrently with the network)."""
    m = Machine(peak_flops=1e12, hbm_bandwidth=1e11, intra_bandwidth=1e10, inter_bandwidth=None,
                host_bandwidth=1e9, name="toy")
    ops = _ops(1e12, 1e10, 2e9) + [Op("out", kind="collective", bytes=3e9, link=HOST, collective="host-out"),
                                   Op("in", kind="collective", bytes=2e9, link=HOST, collective="host-in")]
    p = C.pair_from_ops("h", ops, m, 1.0)
    assert p.t_host == pytest.approx(3.0) and p.t_coll == pytest.approx(0.2)
    for cal in (Calibration(), TRUE):
        assert C.predict(p, cal) == pytest.approx(estimate_step(ops, m, cal).t_step)


def test_select_prefers_the_family_that_predicts_held_out_pairs():
    """Pairs made with all four efficiencies off 1.0: only the full family fits them, exactly (nested band
    0). Pairs made with compute efficiency alone: both fit exactly and the tie goes to the simpler family
    listed first."""
    families = {"compute": C._fixed(SMALL_GRID, memory_efficiency=1.0, link_efficiency=1.0, overlap=0.0),
                "full": SMALL_GRID}
    name, cal, loo, nested = C.select(_pairs(), families)
    assert name == "full" and cal.band == pytest.approx(0.0, abs=1e-9) and len(nested) == len(MIXES)
    assert (cal.compute_efficiency, cal.memory_efficiency, cal.link_efficiency, cal.overlap) == (0.6, 0.8, 0.5, 0.4)
    name, cal, _, _ = C.select(_pairs(Calibration(compute_efficiency=0.6)), families)
    assert name == "compute" and cal.compute_efficiency == 0.6 and cal.band == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        C.select(_pairs()[:2], families)

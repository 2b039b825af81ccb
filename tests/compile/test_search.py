"""compile --search without the compiler: the dimensions it explores, failures as rows, the winner's reason."""
from polychip.compile import search as S
from polychip.compile.run import Request
from polychip.config import REMAT_POLICIES


def _fake_report(req: Request) -> dict:
    """A report whose step time depends on remat and stages, as compile_report would return it."""
    if "stage=" in (req.mesh or ""):
        raise NotImplementedError("pipeline stages are not lowered yet\nmore detail")
    remat = dict(o.split("=") for o in req.overrides)["train.remat"]
    t = {"none": 1.0, "dots": 1.2, "full": 1.5}.get(remat, 1.1)
    hbm = {"none": 40e9}.get(remat, 10e9)  # remat none does not fit a 16 GB chip
    fig = {"hbm_used_per_chip": {"value": hbm}, "step_time": {"value": t, "source": "estimate",
                                                                "note": "compute-bound, sum over ops"},
           "mfu": {"value": 0.5 / t, "unit": "", "upper_bound": True}}
    return {"mode": "train", "fits": hbm < 16e9, "steps": [{"name": "train", "figures": fig}]}


def test_search_explores_remat_policies_and_stages_and_reports_unlowered(monkeypatch):
    monkeypatch.setattr(S, "compile_report", lambda req, show_progress=False: _fake_report(req))
    tried = []
    rows = S.search(Request(model="tiny", target="v5e:2x2"), max_trials=40, on_row=tried.append)
    assert {r["remat"] for r in tried} == set(REMAT_POLICIES)
    staged = [r for r in tried if "stage=" in r["mesh"]]
    assert staged and all(r["error"] == "not lowered: NotImplementedError: pipeline stages are not lowered yet"
                          for r in staged)
    # tiny has 2 layers: only stage=2 divides them
    assert {r["mesh"] for r in staged} == {"stage=2,fsdp=2"}
    ok = [r for r in rows if not r["error"]]
    assert ok[0]["fits"] and ok[0]["step_time"] == 1.1  # the fastest fitting: a selective policy
    line = S.why(rows)
    assert line.startswith("winner mesh fsdp=4, remat ") and "fits (10.00 GB per chip)" in line
    assert "est. step 1.1 s vs 1.1 s for the runner-up" in line and line.endswith("compute-bound")


def test_why_when_nothing_fits_or_nothing_compiles():
    row = {"mesh": "fsdp=4", "remat": "none", "grad_accum": 1, "param_dtype": "float32", "error": "", "fits": False,
           "hbm_used_per_chip": 40e9, "step_time": 1.0}
    assert S.why([row]) == "nothing fits; least HBM per chip: mesh fsdp=4, remat none, grad_accum 1, params float32 (40.00 GB)"
    assert S.why([{**row, "error": "not lowered: x"}]) == "no configuration compiled: not lowered: x"
    fit = {**row, "fits": True, "hbm_used_per_chip": 8e9, "bound": "HBM"}
    slow = {**fit, "remat": "full", "step_time": 1.25}
    assert S.why([fit, slow]).endswith("vs 1.25 s for the runner-up (mesh fsdp=4, remat full, grad_accum 1, "
                                       "params float32; 25.0% slower), HBM-bound")

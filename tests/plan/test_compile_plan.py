"""`compile` and `plan` report one step time for one program on one target.

`polychip compile --record` writes a planner record (compile/report.py planner_record) with the mesh it
compiled; given that record, the planner must use it as is (its step time and its layout), both in the
performance model and in what `polychip plan` prints."""
import json

import pytest

from polychip.cli import main
from polychip.compile.report import planner_record
from polychip.config import MODEL_PRESETS
from polychip.estimate.analytic import Layout
from polychip.hardware import load_catalog
from polychip.plan import TrainWorkload, load_records
from polychip.plan.perf import PerfModel
from polychip.plan.published import published_records

STEP = 1.2345  # the compiled program's step time (as the compile report gives it)


def compile_report() -> dict:
    """The parts of a `polychip compile` train report that planner_record reads."""
    return {"target": {"kind": "tpu", "chip": "tpu-v5e", "chips": 4, "text": "v5e:2x2"}, "fits": True,
            "model": "tiny", "mode": "train", "compute_dtype": "bfloat16", "batch": 8, "seq": 64, "remat": "full",
            "mesh": {"data": 1, "stage": 1, "fsdp": 2, "context": 1, "expert": 1, "tensor": 2},
            "steps": [{"name": "train", "figures": {"step_time": {"value": STEP}, "hbm_used_per_chip": {"value": 1e8},
                                                    "mfu": {"value": 0.01}}}]}


@pytest.fixture
def records(tmp_path):
    folder = tmp_path / "records"
    folder.mkdir()
    (folder / "compiled.json").write_text(json.dumps(planner_record(compile_report())))
    return folder


def test_perf_model_uses_the_compile_record_as_is(records):
    cat = load_catalog()
    pm = PerfModel(published_records() + load_records(records), cat)
    w = TrainWorkload("t", MODEL_PRESETS["tiny"], "tiny", 1e9, 64, 8, remat="full")
    e = pm.train(w, cat["tpu-v5e"], 4)
    assert e.source == "compiler" and e.step_time_s == STEP
    assert e.layout == Layout(fsdp=2, tensor=2) and (e.dp, e.tp) == (2, 2)


def test_plan_prints_the_compiled_step_time(records, tmp_path, capsys):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("horizon: 30d\npools:\n  - {name: v5e, chip: tpu-v5e, count: 4, price: 1.2}\nworkloads:\n"
                     "  - {name: t, kind: train, model: tiny, tokens: 1M, seq_len: 64, batch: 8, remat: full, "
                     "min_chips: 4, max_chips: 4}\n")
    assert main(["plan", str(fleet), "--records", str(records)]) == 0
    assert f"{STEP:.2f} s/step" in capsys.readouterr().out
    assert main(["plan", str(fleet), "--records", str(records), "--json", "-"]) == 0
    p = json.loads(capsys.readouterr().out)["placements"][0]
    assert p["source"] == "compiler" and p["figures"]["step_time_s"] == STEP

"""`polychip plan` end to end: table, JSON, report folder, launch specs, what-if, bad input."""
import json

import pytest
import yaml

from polychip.cli import main

FLEET = """\
start: 2026-09-01
horizon: 30d
site:
  power_cap: 5 MW
pools:
  - {name: gcp-v6e, chip: tpu-v6e, count: 1024, cloud: gcp, region: us-east5}
  - {name: aws-h100, chip: h100, count: 512, cloud: aws, region: us-east-1}
workloads:
  - {name: pretrain-8b, kind: train, model: llama3-8b, tokens: 300B, deadline: 20d}
  - {name: chat-8b, kind: serve, model: llama3-8b, rate: 20/s, prompt_tokens: 1800, output_tokens: 128, tpot: 50ms}
"""


def run(argv):
    """`polychip plan ARGV` through the real command line (its parser and error boundary)."""
    return main(["plan", *argv])


@pytest.fixture
def fleet_file(tmp_path):
    f = tmp_path / "fleet.yaml"
    f.write_text(FLEET)
    return f


def test_plan_writes_report_json_and_launch_specs(fleet_file, tmp_path, capsys):
    rep = tmp_path / "rep"
    assert run([str(fleet_file), "--report", str(rep), "--json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "pretrain-8b" in out and "chat-8b" in out and "ESTIMATE" in out  # v6e power is an estimate
    for name in ("index.html", "plan.json", "chips.png", "cost_energy.png", "power.png"):
        assert (rep / name).stat().st_size > 0, name
    assert (rep / "chips.png").read_bytes()[:4] == b"\x89PNG"
    body = json.loads((tmp_path / "p.json").read_text())
    assert body["status"] == "optimal" and {p["workload"] for p in body["placements"]} == {"pretrain-8b", "chat-8b"}
    for p in body["placements"]:
        assert p["source"] in ("roofline", "estimate", "measured", "compiler") and p["detail"]
    specs = sorted((rep / "launch").glob("*.yaml"))
    assert len(specs) == len(body["placements"])
    for s in specs:
        t = yaml.safe_load(s.read_text())
        assert t["resources"]["accelerators"] and t["run"].startswith("polychip ")
    html = (rep / "index.html").read_text()
    assert "power.png" in html and "ESTIMATE" in html


def test_whatif_shows_the_difference(fleet_file, capsys):
    assert run([str(fleet_file), "--price", "tpu-v6e=20", "--scale-pool", "aws-h100=2"]) == 0
    out = capsys.readouterr().out
    assert "difference" in out and "price 2.7 -> 20.0" in out and "512 -> 1024 chips" in out


def test_infeasible_power_cap_exits_1_with_reason(fleet_file, capsys):
    assert run([str(fleet_file), "--power-cap", "10kW"]) == 1
    assert "power cap short by" in capsys.readouterr().out


def test_records_folder_changes_the_source(fleet_file, tmp_path, capsys):
    recs = tmp_path / "recs"
    recs.mkdir()
    (recs / "r.json").write_text(json.dumps({"chip": "h100", "model": "llama3-8b", "mode": "train", "chips": 256,
                                             "batch": 256, "seq": 8192, "step_time_s": 0.2, "remat": "none",
                                             "source": "measured"}))
    assert run([str(fleet_file), "--records", str(recs), "--objective", "time", "--json", "-"]) == 0
    body = json.loads(capsys.readouterr().out)
    pre = next(p for p in body["placements"] if p["workload"] == "pretrain-8b")
    assert pre["chip"] == "h100" and pre["source"] == "measured"


@pytest.mark.parametrize("text, needle", [
    (FLEET.replace("count: 512", "count: -512"), "line 7, field pools[1].count"),
    (FLEET.replace("chip: h100", "chip: h1000"), "line 7, field pools[1].chip"),
    (FLEET.replace("tokens: 300B", "tokens: 300 bananas"), "line 9, field workloads[0].tokens"),
    (FLEET.replace("power_cap: 5 MW", "power_cap: 5 MJ"), "line 4, field site.power_cap"),
])
def test_bad_input_one_line_exit_2(tmp_path, capsys, text, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    assert run([str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and err.startswith("polychip plan: error:") and "\n" not in err


def test_missing_file_and_bad_whatif(fleet_file, tmp_path, capsys):
    assert run([str(tmp_path / "nope.yaml")]) == 2
    assert run([str(fleet_file), "--scale-pool", "nosuch=2"]) == 2
    assert run([str(fleet_file), "--power-cap", "lots"]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "no pool named 'nosuch'" in err and "--power-cap lots" in err

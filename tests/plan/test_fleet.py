"""Fleet file parsing: good files load; bad ones fail naming the line and field."""
import pytest

from polychip.config import MODEL_PRESETS
from polychip.plan import PlanError, parse_fleet

GOOD = """\
start: 2026-09-01
horizon: 30d
site:
  power_cap: 500 MW
  power_overhead: 1.2
pools:
  - name: gcp-v6e
    chip: v6e
    count: 4096
    cloud: gcp
    available: 2026-09-11
  - name: aws-h100
    chip: h100
    count: 512
    price: 3.5
    pricing: reserved
  - name: tpu-metered
    chip: tpu-v5e
    count: 64
    power_w: 250 W
workloads:
  - name: pretrain
    kind: train
    model: llama3-8b
    tokens: 2T
    deadline: 20d
    chips: [tpu-v6e, h100]
    min_chips: 64
  - name: custom
    kind: train
    model: {d_model: 512, n_layers: 4, n_heads: 8, vocab_size: 1000, max_seq_len: 1024}
    tokens: 5e9
    seq_len: 1024
    batch: 64
  - name: chat
    kind: serve
    model: llama3-70b
    rate: 3000/min
    prompt_tokens: 1800
    output_tokens: 256
    ttft: 2s
    tpot: 60ms
"""


def test_good_fleet_parses_units():
    f = parse_fleet(GOOD, "fleet.yaml")
    assert f.horizon_h == 720 and f.power_cap_w == 500e6 and f.power_overhead == 1.2
    v6e, h100, v5e = f.pools
    assert v6e.chip.name == "tpu-v6e" and v6e.available_h == 240 and v6e.price_per_hour == 2.70
    assert v6e.power_estimated and "ESTIMATE" in v6e.power_source  # TPU power is not published
    assert h100.price_per_hour == 3.5 and h100.pricing == "reserved" and h100.power_w == 700
    assert not h100.power_estimated and v5e.power_w == 250 and not v5e.power_estimated
    pre, custom, chat = f.workloads
    assert pre.tokens == 2e12 and pre.deadline_h == 480 and pre.chips == ("tpu-v6e", "h100")
    assert pre.model == MODEL_PRESETS["llama3-8b"] and pre.seq_len == 8192 and pre.batch == 256
    assert custom.model.d_model == 512 and custom.model_name == "custom"
    assert chat.rate == pytest.approx(50) and chat.ttft_s == 2 and chat.tpot_s == pytest.approx(0.06)


def _bad(text, *needles):
    with pytest.raises(PlanError) as e:
        parse_fleet(text, "f.yaml")
    msg = str(e.value)
    for n in needles:
        assert n in msg, msg
    return msg


POOLS = "pools:\n  - {name: a, chip: h100, count: 8}\n"
WORK = "workloads:\n  - {name: w, kind: train, model: tiny, tokens: 1M}\n"


@pytest.mark.parametrize("text, needles", [
    ("pools:\n  - name: a\n    chip: h900\n    count: 8\n" + WORK, ["line 3", "pools[0].chip", "unknown chip 'h900'", "h100"]),
    ("pools:\n  - name: a\n    chip: h100\n    count: -4\n" + WORK, ["line 4", "pools[0].count", ">= 1"]),
    ("pools:\n  - name: a\n    chip: h100\n" + WORK, ["line 2", "pools[0]", "missing field 'count'"]),
    (POOLS + "workloads:\n  - name: w\n    kind: train\n    model: tiny\n    tokens: 5 parsecs\n",
     ["line 7", "workloads[0].tokens", "parsecs"]),
    ("site:\n  power_cap: 5 furlongs\n" + POOLS + WORK, ["line 2", "site.power_cap"]),
    (POOLS + "workloads:\n  - name: w\n    kind: train\n    model: gpt5\n    tokens: 1M\n",
     ["line 6", "workloads[0].model", "unknown model preset"]),
    (POOLS + "workloads:\n  - name: w\n    kind: train\n    model: tiny\n    tokens: 1M\n    colour: red\n",
     ["line 8", "workloads[0].colour", "unknown field"]),
    (POOLS + "workloads:\n  - name: w\n    kind: dance\n", ["line 5", "workloads[0].kind"]),
    (POOLS + "workloads:\n  - {name: s, kind: serve, model: tiny, rate: 5, prompt_tokens: 100, output_tokens: 10, tpot: 3 fortnights}\n",
     ["line 4", "workloads[0].tpot"]),
    ("pools:\n  - {name: a, chip: h100, count: 8}\n  - {name: a, chip: h100, count: 8}\n" + WORK,
     ["line 3", "duplicate name"]),
    (POOLS + "workloads:\n  - {name: w, kind: train, model: {d_model: 64, n_heads: 3}, tokens: 1M}\n",
     ["line 4", "workloads[0].model"]),
    ("pools: [\n", ["not valid YAML"]),
    ("site: {require_power: true}\npools:\n  - {name: a, chip: tpu-v5e, count: 8}\n" + WORK,
     ["line 3", "pools[0].power_w", "no published power"]),
    (POOLS + "workloads:\n  - {name: w, kind: train, model: tiny, tokens: 1M, min_chips: 8, max_chips: 4}\n",
     ["workloads[0].max_chips", "below min_chips"]),
    (POOLS + "workloads:\n  - {name: w, kind: train, model: tiny, tokens: 1M, layout: {fsdp: 0}}\n",
     ["line 4", "workloads[0].layout.fsdp", ">= 1"]),
    (POOLS + "workloads:\n  - {name: w, kind: train, model: tiny, tokens: 1M, layout: {pipeline: 2}}\n",
     ["workloads[0].layout.pipeline", "unknown field", "stage"]),
    (POOLS + "workloads:\n  - {name: w, kind: train, model: tiny, tokens: 1M, layout: {fsdp: 8, zero1: yes please}}\n",
     ["workloads[0].layout.zero1", "true or false"]),
    (POOLS + "workloads:\n  - {name: w, kind: train, model: tiny, tokens: 1M, layout: 8}\n",
     ["workloads[0].layout", "must be a mapping"]),
    (POOLS + "workloads:\n  - {name: w, kind: train, model: tiny, tokens: 1M, grad_accum: 2.5}\n",
     ["workloads[0].grad_accum", "whole number"]),
])
def test_bad_fleet_names_line_and_field(text, needles):
    msg = _bad(text, "f.yaml", *needles)
    assert "\n" not in msg


def test_date_without_start_is_an_error():
    _bad("pools:\n  - {name: a, chip: h100, count: 8, available: 2026-01-01}\n" + WORK, "needs a top-level 'start:'")

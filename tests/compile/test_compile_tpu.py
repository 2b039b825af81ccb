"""Deviceless TPU compiles checked against independently computed values.

tiny on v5e:2x2 (4 chips, fsdp=4) and llama3-70b on one v5e chip (does not fit). Compile results are
cached per test session in a temporary POLYCHIP_CACHE_DIR, so the cache itself is exercised too.
"""
import json

import pytest

from polychip.compile.run import Request, compile_report
from polychip.config import build_config
from polychip.model import flops as F


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("compile_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("POLYCHIP_CACHE_DIR", str(d))
    yield d
    mp.undo()


REF_K = ("kernels.attention=reference", "kernels.cross_entropy=reference", "kernels.rms_norm=reference",
         "train.layer_loop=scan")  # a real loop, as in every deep model (tiny would otherwise unroll)


@pytest.fixture(scope="module")
def tiny(cache_dir):
    return compile_report(Request(model="tiny", target="v5e:2x2", overrides=REF_K))


def _f(rep, key, step=0):
    return rep["steps"][step]["figures"][key]


def test_tiny_memory_against_parameter_count(tiny):
    cfg = build_config("tiny")
    n, dev = cfg.model.n_params, tiny["target"]["devices"]
    param_bytes = 4 * n  # float32 master weights
    state_bytes = 3 * param_bytes  # + AdamW mu and nu, float32
    arg = _f(tiny, "argument_bytes_per_device")
    assert arg["source"] == "compiled"
    # Every device holds at least its 1/4 shard of params + optimizer state (TPU tiling pads small arrays).
    assert arg["value"] >= state_bytes / dev
    # ... and not more than the whole unsharded state plus the batch and tile padding (tiny arrays pad a lot).
    assert arg["value"] <= state_bytes * 2
    # Donation: the new state aliases the old, so aliased bytes cover the sharded state.
    assert _f(tiny, "alias_bytes_per_device")["value"] >= state_bytes / dev
    used = _f(tiny, "hbm_used_per_device")["value"]
    # "used" is what the compiler's buffer assignment allocates in HBM; the sum of the parts is reported beside it
    assert "buffer assignment" in _f(tiny, "hbm_used_per_device")["note"]
    assert _f(tiny, "hbm_sum_per_device")["value"] == (
        arg["value"] + _f(tiny, "output_bytes_per_device")["value"] - _f(tiny, "alias_bytes_per_device")["value"]
        + _f(tiny, "temp_bytes_per_device")["value"] + _f(tiny, "generated_code_bytes_per_device")["value"])
    assert arg["value"] <= used <= _f(tiny, "hbm_sum_per_device")["value"]
    assert tiny["fits"] is True
    assert _f(tiny, "hbm_per_device")["value"] == 16e9  # catalog: v5e 16 GB
    assert _f(tiny, "hbm_margin_per_device")["value"] == 16e9 - used


def test_tiny_flops_relations(tiny):
    """Model formula vs traced program vs the compiler's count.

    - program FLOPs (reference attention = dense T x T, reference CE) = the model formula with full context T,
      exactly (tests/compile/test_program_flops.py proves the identity; here it must survive lowering).
    - the compiler's cost_analysis FLOPs are PER DEVICE and count each loop body ONCE: they match the
      traced count with loops once divided by the device count within 15% (the compiler also counts
      elementwise work - softmax, norms, AdamW - which the matmul-only program count leaves out), and
      are nowhere near the global figure.
    """
    cfg = build_config("tiny")
    m, B, T = cfg.model, cfg.train.batch_size, cfg.train.seq_len
    dense = 3 * (2 * F.matmul_params(m) + 4 * m.n_layers * m.n_heads * m.head_dim * T) * B * T
    assert _f(tiny, "model_flops")["value"] == F.train_flops_per_step(m, B, T)
    assert _f(tiny, "program_flops")["value"] == pytest.approx(dense, rel=1e-9)
    comp = _f(tiny, "compiler_flops_per_device")
    once = _f(tiny, "program_flops_loops_once_per_device")["value"]
    assert comp["source"] == "compiler-estimate"
    assert comp["value"] == pytest.approx(once, rel=0.15)
    assert comp["value"] < 0.5 * _f(tiny, "program_flops")["value"]  # not a global count
    # The compiled loops (forward and backward layer scans) carry the layer count.
    assert any("trip counts 2, 2" in n for n in tiny["steps"][0]["notes"])


def test_tiny_estimate_is_consistent(tiny):
    t = _f(tiny, "step_time")
    assert t["source"] == "estimate" and t["value"] > 0
    ops, exposed = _f(tiny, "t_ops")["value"], _f(tiny, "t_exposed_collectives")["value"]
    assert t["value"] == pytest.approx(ops + exposed)
    assert ops == pytest.approx(_f(tiny, "t_compute")["value"] + _f(tiny, "t_hbm")["value"])
    peak = 197e12  # catalog v5e bf16 (float32 runs are reported against it)
    mfu = _f(tiny, "mfu")
    from polychip.estimate.calibration import calibration_for

    band = calibration_for("tpu").band
    if band is None:  # uncalibrated: an upper bound from the ops with collectives hidden
        assert mfu["upper_bound"] and mfu["value"] == pytest.approx(
            _f(tiny, "model_flops")["value"] / (max(ops, _f(tiny, "t_collectives")["value"]) * 4 * peak))
    else:  # calibrated: the estimate and the range its band allows
        assert mfu["value"] == pytest.approx(_f(tiny, "model_flops")["value"] / (t["value"] * 4 * peak))
        assert mfu["range"] == pytest.approx([mfu["value"] * (1 - band), mfu["value"] * (1 + band)])
        assert f"validated error band +/-{band:.0%}" in t["note"]
    assert 0 < mfu["value"] <= 1.0


def test_cache_hit_and_planner_record(tiny, cache_dir):
    again = compile_report(Request(model="tiny", target="v5e:2x2", overrides=REF_K))
    assert again["cached"] is True and tiny["cached"] is False
    assert _f(again, "temp_bytes_per_device") == _f(tiny, "temp_bytes_per_device")
    assert list(cache_dir.glob("compile/*.json"))
    from polychip.compile.report import planner_record
    from polychip.plan.records import parse_record

    rec = planner_record(tiny)
    parsed = parse_record(json.loads(json.dumps(rec)))
    assert parsed.source == "compiler" and parsed.chips == 4 and parsed.step_time_s == _f(tiny, "step_time")["value"]


def test_llama3_70b_on_one_v5e_does_not_fit(cache_dir):
    rep = compile_report(Request(model="llama3-70b", target="v5e:1x1", batch=1, seq=1024))
    assert rep["fits"] is False
    cfg = build_config("llama3-70b")
    state = 3 * 4 * cfg.model.n_params  # float32 params + AdamW moments, all on the one chip
    arg = _f(rep, "argument_bytes_per_device")["value"]
    assert state <= arg <= state + 1e6  # + the [1, 1025] int32 batch and the step counter
    assert _f(rep, "hbm_margin_per_device")["value"] < -(state - 16e9)
    assert _f(rep, "hbm_used_per_device")["value"] > 50 * 16e9


def test_tiny_serve_prefill_and_decode(cache_dir):
    """Serve compiles the engine's paged step: the KV pool holds batch x (prompt + output) tokens in
    whole pages plus the scratch page, replicated (pages are shared by all sequences, and tiny's 2 kv
    heads do not split over fsdp), next to each device's shard of the weights."""
    from polychip.compile.lower import SERVE_PAGE_SIZE
    from polychip.serve import paged_model as PM

    rep = compile_report(Request(model="tiny", target="v5e:2x2", mode="serve", batch=4, seq=64, output_tokens=32))
    steps = {s["name"]: s for s in rep["steps"]}
    assert set(steps) == {"prefill", "decode"} and rep["fits"] is True
    m = build_config("tiny").model
    pool = (4 * PM.pages_for(64 + 32, SERVE_PAGE_SIZE) + 1) * PM.bytes_per_block(m, SERVE_PAGE_SIZE)
    assert pool == 2 * m.n_layers * (4 * 96 + 16) * m.n_kv_heads * m.head_dim * 4  # K and V, float32
    params = 4 * m.n_params
    for s in steps.values():
        args = s["figures"]["argument_bytes_per_device"]["value"]
        assert args >= pool + params / 4  # or more: TPU tiles pad small minor dimensions
        assert s["figures"]["program_flops"]["value"] > 0
    dec = steps["decode"]["figures"]
    assert dec["model_flops"]["value"] == F.decode_flops_per_token(m, 64 + 32 - 1) * 4
    assert rep["kernels"]["decode"]["paged_attention"] == "reference"  # multi-device: the Pallas kernel falls back


def test_serve_compile_and_engine_share_the_step_builder(cache_dir, monkeypatch):
    """What `compile --mode serve` lowers is what the engine runs: both get their step from
    paged_model.jit_step (compile with shardings for the target mesh, the engine without)."""
    import jax

    from polychip.model import transformer as T
    from polychip.serve import paged_model as PM
    from polychip.serve.engine import Engine, EngineConfig

    built = []
    real = PM.jit_step
    monkeypatch.setattr(PM, "jit_step", lambda cfg, rt, shardings=None: built.append(shardings) or real(cfg, rt, shardings))
    compile_report(Request(model="tiny", target="v5e:1x1", mode="serve", batch=2, seq=32, output_tokens=8,
                           use_cache=False))
    assert len(built) == 2 and all(b is not None for b in built)  # prefill and decode
    cfg = build_config("tiny").model
    eng = Engine(cfg, T.init_params(cfg, jax.random.key(0)), EngineConfig(max_batch=2, kv_blocks=9))
    assert built[-1] is None and eng.runner.step is not None and len(built) == 3


def test_tiny_with_pallas_kernels_counts_their_declared_flops(cache_dir):
    """Pallas kernels (flash attention, RMSNorm, fused cross-entropy) under shard_map: the traced program
    and the estimator's HLO walk both include what the kernels declare."""
    rep = compile_report(Request(model="tiny", target="v5e:2x2", overrides=("train.layer_loop=scan",)))
    assert "polychip_flash" in rep["kernels"]["train"]["attention"] or "pallas" in rep["kernels"]["train"]["attention"]
    est = _f(rep, "estimate_flops_per_device")
    assert _f(rep, "declared_flops_per_device")["value"] > 0
    prog = _f(rep, "program_flops_per_device")["value"]
    # the same program seen twice: the jaxpr (matmuls + declared kernel cost) and the compiled HLO ops
    assert est["value"] == pytest.approx(prog, rel=0.01)

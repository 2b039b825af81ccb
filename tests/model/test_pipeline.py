"""Pipeline parallelism on 8 simulated CPU devices: the pipelined train step gives the single-device
losses and gradients (fp32; differences come only from reduction order)."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from polychip.config import ConfigError, build_config
from polychip.model import pipeline
from polychip.model import transformer as T
from polychip.train.step import StepSpec
from tests.conftest import steps_and_grads


def _cfg(stage=1, fsdp=1, data=1, micro=0, repeats=1, layers=8, **extra):
    over = [f"mesh.stage={stage}", f"mesh.fsdp={fsdp}", f"mesh.data={data}", f"mesh.num_devices={stage * fsdp * data}",
            f"model.n_layers={layers}", f"train.pipeline_microbatches={micro}", f"train.pipeline_repeats={repeats}",
            "train.batch_size=8", "train.seq_len=16", "train.warmup_steps=0", "train.lr=1e-2", "train.steps=2"]
    return build_config("tiny", overrides=over + [f"{k.replace('__', '.')}={v}" for k, v in extra.items()])




def _run(cfg, n_steps=2):
    """(losses, first gradients) through the one step builder."""
    return steps_and_grads(cfg, n_steps)[:2]


@pytest.fixture(scope="module")
def baseline():
    return _run(_cfg())


CASES = {
    "2-stages": dict(stage=2),
    "4-stages-8-micro": dict(stage=4, micro=8),
    "4-stages-circular-2": dict(stage=4, micro=4, repeats=2),
    "2-stages-x-fsdp-4": dict(stage=2, fsdp=4, micro=2),
    "2-stages-x-data-2-x-fsdp-2-remat": dict(stage=2, fsdp=2, data=2, micro=2, train__remat="full"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_pipeline_equals_single_device(baseline, case):
    base_losses, base_grads = baseline
    losses, grads = _run(_cfg(**CASES[case]))
    np.testing.assert_allclose(losses, base_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, base_grads)


def test_layer_stack_is_split_over_stages_and_scheduled():
    cfg = _cfg(stage=4, micro=8, repeats=2)
    spec = StepSpec.build(cfg)
    assert spec.shardings["params"]["layers"]["wq"].spec == P("stage", None, None, None)
    loss = jax.make_jaxpr(lambda p, b: T.loss_fn(p, b, cfg.model, spec.runtime)[0])
    text = str(loss(spec.abstract_state["params"], spec.abstract_batch))
    assert "length=19" in text  # R*M + S - 1 = 2*8 + 4 - 1 iterations of the schedule


def test_bubble_fraction():
    assert pipeline.bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert pipeline.bubble_fraction(4, 8, repeats=2) == pytest.approx(3 / 19)
    assert pipeline.bubble_fraction(1, 4) == 0


@pytest.mark.parametrize("over, msg", [
    (dict(stage=4, layers=6), "not divisible by mesh.stage=4"),
    (dict(stage=4, micro=2), "fewer than mesh.stage=4"),
    (dict(stage=2, micro=3), "not divisible by train.pipeline_microbatches=3"),
    (dict(stage=2, repeats=3, layers=8), "pipeline_repeats=3"),
])
def test_bad_pipelines_are_refused(over, msg):
    with pytest.raises(ConfigError, match=msg):
        _cfg(**over)


def test_pipeline_compiles_for_a_tpu_slice(tmp_path, monkeypatch):
    """Deviceless compile (libtpu) of a 2-stage x fsdp-4 pipeline on v5e:2x4: it fits, the schedule is a
    compiled loop of M + S - 1 = 5 iterations, and stages hand activations on by collective-permute."""
    from polychip.compile.run import Request, compile_report

    monkeypatch.setenv("POLYCHIP_CACHE_DIR", str(tmp_path))
    rep = compile_report(Request(model="tiny", target="v5e:2x4", mesh="stage=2,fsdp=4", overrides=(
        "model.n_layers=4", "train.batch_size=16", "train.pipeline_microbatches=4", "train.layer_loop=scan")))
    assert rep["fits"] is True and rep["mesh"]["stage"] == 2
    step = rep["steps"][0]
    assert any("trip counts" in n and " 5" in n for n in step["notes"])
    assert "collective-permute" in str(step["figures"]["collective_bytes_per_device"])

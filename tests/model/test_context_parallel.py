"""Context (sequence) parallelism on 8 simulated CPU devices: attention with the sequence split over
the `context` mesh axis gives the unsplit run's losses and gradients (fp32)."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from polychip.config import build_config
from polychip.kernels.attention import attention, reference
from polychip.kernels.registry import KernelPolicy, Target
from polychip.model import transformer as T
from polychip.parallel.mesh import make_mesh
from polychip.parallel.sharding import Layout
from polychip.train.step import StepSpec
from tests.conftest import steps_and_grads


def _cfg(context=1, fsdp=1, tensor=1, **extra):
    over = [f"mesh.context={context}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}",
            f"mesh.num_devices={context * fsdp * tensor}", "train.batch_size=4", "train.seq_len=32",
            "train.warmup_steps=0", "train.lr=1e-2", "train.steps=2"]
    return build_config("tiny", overrides=over + [f"{k.replace('__', '.')}={v}" for k, v in extra.items()])




def _run(cfg, n_steps=2):
    """(losses, first gradients) through the one step builder."""
    return steps_and_grads(cfg, n_steps)[:2]


CASES = {
    "context-2": dict(context=2),
    "context-4": dict(context=4),
    "context-4-x-fsdp-2": dict(context=4, fsdp=2),
    "context-2-x-tensor-2-sliding-window": dict(context=2, tensor=2, model__sliding_window=12),
}


@pytest.fixture(scope="module")
def baseline():
    return _run(_cfg())


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_context_parallel_equals_unsplit(baseline, case):
    model = {k: v for k, v in CASES[case].items() if k.startswith("model__")}  # the baseline needs them too
    base_losses, base_grads = _run(_cfg(**model)) if model else baseline
    losses, grads = _run(_cfg(**CASES[case]))
    np.testing.assert_allclose(losses, base_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, base_grads)


def test_attention_splits_queries_and_gathers_keys():
    """The op itself, through KernelPolicy.call: the per-shard program all-gathers K/V over `context`,
    its output stays split over `context`, and it equals the reference with an absolute query offset."""
    layout = Layout.create(make_mesh(_cfg(context=4).mesh))
    policy = KernelPolicy.create(Target.of()).with_layout(layout)
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (2, 16, 4, 8))
    k, v = (jax.random.normal(kk, (2, 16, 2, 8)) for kk in ks[1:])
    split = layout.sharding(("batch", "seq", None, None))
    q, k, v = (jax.device_put(a, split) for a in (q, k, v))
    fn = jax.jit(lambda q, k, v: attention(q, k, v, policy=policy, causal=True, sliding_window=5))
    assert "all-gather" in fn.lower(q, k, v).compile().as_text()
    out = fn(q, k, v)
    assert out.sharding.spec == P(None, "context", None, None)
    want = reference.attention(q, k, v, causal=True, sliding_window=5)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_model_attention_takes_the_context_path():
    cfg = _cfg(context=4)
    spec = StepSpec.build(cfg)
    loss = jax.make_jaxpr(lambda p, b: T.loss_fn(p, b, cfg.model, spec.runtime)[0])
    text = str(loss(spec.abstract_state["params"], spec.abstract_batch))
    assert text.count("all_gather") == 2 * cfg.model.n_layers  # K and V of every layer (unrolled)

"""Expert parallelism: the moe-tiny train step on 8 simulated CPU devices with the experts split over
the `expert` mesh axis (tokens exchanged by all-to-all) gives the single-device losses and gradients."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from polychip.config import build_config
from polychip.model import transformer as T
from polychip.train.step import StepSpec
from tests.conftest import steps_and_grads

# (data, fsdp, expert, tensor); moe-tiny has 4 experts.
MESHES = [(1, 2, 4, 1), (1, 4, 2, 1), (2, 1, 2, 2)]


def _cfg(mesh, *extra):
    d, f, e, t = mesh
    return build_config("moe-tiny", overrides=[
        f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.expert={e}", f"mesh.tensor={t}", f"mesh.num_devices={d * f * e * t}",
        "train.batch_size=8", "train.seq_len=32", "train.warmup_steps=0", "train.lr=1e-2", "train.steps=3", *extra])


def _run(mesh, *extra, n_steps=3):
    """([(loss, moe_aux_loss)] per step, first gradients, final state)."""
    return steps_and_grads(_cfg(mesh, *extra), n_steps, metrics=("loss", "moe_aux_loss"))[:3]


@pytest.fixture(scope="module")
def baseline():
    return _run((1, 1, 1, 1))


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "d{}f{}e{}t{}".format(*m))
def test_expert_parallel_matches_single_device(baseline, mesh):
    base_losses, base_grads, _ = baseline
    losses, grads, state = _run(mesh)
    np.testing.assert_allclose(losses, base_losses, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, base_grads)
    w = state["params"]["layers"]["moe_gate"]  # [L, E, D, F] = (layers, exp, embed, mlp)
    assert w.sharding.spec[1] == "expert" and w.addressable_shards[0].data.shape[1] == 4 // mesh[2]


def test_batch_split_over_expert_too(baseline):
    """A rule table that also splits the batch over `expert` (MaxText's layout): no token slicing or
    all-gather around the all-to-all, same numbers."""
    losses, grads, _ = _run((1, 2, 4, 1), 'mesh.rules={"batch": ["data", "fsdp", "expert"]}')
    np.testing.assert_allclose(losses, baseline[0], rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, baseline[1])


def test_expert_weights_are_split_over_the_expert_axis():
    _, _, state = _run((1, 2, 4, 1), n_steps=1)
    w = state["params"]["layers"]["moe_down"]  # [L, E, F, D]
    assert w.sharding.spec == P(None, "expert", None, "fsdp")
    assert w.addressable_shards[0].data.shape == (2, 1, 64, 32)


def test_too_few_tokens_to_split_falls_back_to_the_plain_dispatch():
    """6 tokens cannot be split 8 ways (fsdp 2 x expert 4): the layer runs unsplit, same logits."""
    cfg = _cfg((1, 2, 4, 1))
    spec = StepSpec.build(cfg, check=False)
    params = T.init_params(cfg.model, jax.random.key(0))
    toks = jax.random.randint(jax.random.key(1), (2, 3), 0, cfg.model.vocab_size)
    sharded = jax.jit(lambda p, t: T.logits(p, t, cfg.model, spec.runtime)[0])(params, toks)
    plain = T.logits(params, toks, cfg.model, T.Runtime(spec.runtime.policy.with_layout(None)))[0]
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(plain), rtol=1e-5, atol=1e-6)


def test_tpu_expert_exchange_is_ragged():
    """Deviceless compile of the moe-tiny train step (gradients included) for v5e:2x4, fsdp 2 x expert 4:
    "auto" exchanges tokens with XLA's ragged-all-to-all (only the rows sent move), the reference with a
    padded all-to-all whose every per-pair chunk is sized for the worst case: a token's 2 experts are
    distinct and each shard holds 1 of the 4, so one shard gets at most 1 pair per token, 2x the rows of
    balanced routing (ep x min(k, E_local) / k)."""
    pytest.importorskip("libtpu")
    from polychip.compile.target import parse_target, tpu_devices
    from polychip.estimate.hlo import ops_from_hlo
    from polychip.kernels.registry import Target

    devices = tpu_devices(parse_target("v5e:2x4"))
    moved, text = {}, {}
    for exchange in ("auto", "reference"):
        # d_model 512: rows of a whole 128-lane TPU tile (the 64 of moe-tiny would be padded 2x on both sides)
        cfg = _cfg((1, 2, 4, 1), "model.d_model=512", "train.compute_dtype=bfloat16", f"kernels.ragged_all_to_all={exchange}",
                   "kernels.grouped_matmul=reference", "kernels.attention=reference", "kernels.cross_entropy=reference",
                   "kernels.rms_norm=reference")
        step = StepSpec.build(cfg, devices=devices, target=Target("tpu", devices[0].device_kind), check=False)
        text[exchange] = step.jitted.lower(step.abstract_state, step.abstract_batch).compile().as_text()
        # the MoE layers' exchanges (inside its shard_map; the embedding lookup's all-to-alls are not)
        moved[exchange] = sum(o.bytes * o.count for o in ops_from_hlo(text[exchange], 8)
                              if o.collective in ("all-to-all", "ragged-all-to-all") and "shard_map/" in o.name)
    assert "ragged-all-to-all(" in text["auto"] and "ragged-all-to-all(" not in text["reference"]
    assert moved["reference"] / moved["auto"] == pytest.approx(2.0, rel=0.01)

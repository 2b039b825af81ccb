"""Gradient accumulation with any divisor of the per-replica batch; tensor degrees vs heads and KV heads."""
import re

import jax
import numpy as np
import pytest

from polychip.config import ConfigError, build_config
from polychip.train.step import StepSpec
from tests.conftest import random_batches, run_train_steps

BASE = ["train.batch_size=12", "train.seq_len=16", "train.warmup_steps=0", "train.steps=10"]


def _cfg(*overrides):
    return build_config("tiny", overrides=[*BASE, *overrides])


@pytest.mark.parametrize("accum", [3, 6])
def test_accumulation_over_any_divisor_of_the_per_replica_batch_matches_one_batch(accum):
    # 12 rows over fsdp=2: 6 per replica, so 3 and 6 micro-batches (neither divides by 4 or a power of 2)
    ref = _cfg("mesh.fsdp=2", "mesh.num_devices=2")
    l1, _, s1, _ = run_train_steps(ref, random_batches(ref, 2, seed=3))
    cfg = _cfg("mesh.fsdp=2", "mesh.num_devices=2", f"train.grad_accum={accum}")
    l2, _, s2, _ = run_train_steps(cfg, random_batches(cfg, 2, seed=3))
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    # Adam divides by sqrt(nu): near-zero gradients' summation-order differences reach ~lr/100 per step
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), jax.device_get(s2["params"]),
                 jax.device_get(s1["params"]))


def _collectives(*overrides) -> dict:
    spec = StepSpec.build(_cfg("mesh.fsdp=4", "mesh.num_devices=4", *overrides))
    hlo = spec.jitted.lower(spec.abstract_state, spec.abstract_batch).compile().as_text()
    return {k: len(re.findall(rf"= [^=]* {k}\(", hlo)) for k in ("all-gather", "all-to-all", "collective-permute")}


def test_micro_batches_stay_on_the_devices_that_hold_their_rows():
    """Splitting the batch into micro-batches adds no collective: no row moves between devices (a
    contiguous split gathers the whole [B, T+1] batch onto every device first: one more all-gather)."""
    assert _collectives("train.grad_accum=3") == _collectives()


@pytest.mark.parametrize("overrides, msg", [
    (["mesh.fsdp=2", "mesh.num_devices=2", "train.grad_accum=4"],
     "train.grad_accum=4 does not divide the per-replica batch 6 .*valid: 1, 2, 3, 6"),
    (["mesh.fsdp=8", "mesh.num_devices=8"], "train.batch_size=12 is not divisible by the data-parallel ways 8"),
    (["model.n_heads=6", "model.n_kv_heads=3", "model.d_model=96", "mesh.tensor=2", "mesh.fsdp=1",
      "mesh.num_devices=2"], "mesh.tensor=2 neither divides model.n_kv_heads=3 nor is a multiple of it"),
    (["mesh.tensor=8", "mesh.fsdp=1", "mesh.num_devices=8"], "model.n_heads=4 is not divisible by mesh.tensor=8"),
])
def test_the_builder_refuses_what_the_mesh_cannot_split(overrides, msg):
    with pytest.raises(ConfigError, match=msg):
        StepSpec.build(_cfg(*overrides))


def test_more_tensor_ways_than_kv_heads_replicates_kv_heads_and_says_so():
    # tiny: 4 heads, 2 KV heads; tensor=4 gives each KV head to 2 devices
    ref = _cfg("mesh.fsdp=1", "mesh.num_devices=1")
    cfg = _cfg("mesh.tensor=4", "mesh.fsdp=1", "mesh.num_devices=4")
    l1, _, _, _ = run_train_steps(ref, random_batches(ref, 2, seed=4))
    l2, spec, state, _ = run_train_steps(cfg, random_batches(cfg, 2, seed=4))
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    assert spec.dropped()[0].startswith("KV-head replication: model.n_kv_heads=2 on mesh.tensor=4")
    assert state["params"]["layers"]["wq"].sharding.spec[2] == "tensor"

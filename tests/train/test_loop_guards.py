"""The loop's guards: a diverged run stops without saving the bad step; one run per folder."""
import pytest

from polychip.config import build_config
from polychip.files import RunLock, RunLockedError
from polychip.train.checkpoint import Checkpointer
from polychip.train.health import NonFiniteError
from polychip.train.loop import train

COMMON = ["data.max_bytes=100000", "train.steps=8", "train.checkpoint_every=2", "train.warmup_steps=0",
          "mesh.num_devices=1"]


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    # a huge learning rate: Adam's first updates are ~lr in size, so the weights blow up within a few steps
    cfg = build_config("tiny", overrides=[f"out_dir={tmp_path}", *COMMON, "train.lr=1e12", "train.grad_clip=0"])
    with pytest.raises(NonFiniteError, match=r"step \d+: .*(nan|inf)") as e:
        train(cfg, log=lambda *a: None)
    ck = Checkpointer(tmp_path)
    try:
        steps = ck.steps()
    finally:
        ck.close()
    bad = int(str(e.value).split(":")[0].split()[1])
    assert all(s < bad for s in steps), (steps, bad)  # the diverged step was never saved
    if steps:
        assert f"step {max(steps)}" in str(e.value)


def test_a_second_run_on_the_same_folder_is_refused(tmp_path):
    cfg = build_config("tiny", overrides=[f"out_dir={tmp_path}", *COMMON])
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match="in use by pid"):
            train(cfg, log=lambda *a: None)


def test_nan_after_checkpoints_keeps_the_newest_good_one(tmp_path, monkeypatch):
    """Loss turns NaN at step 5 (injected into the real step's metrics): checkpoints 2 and 4 stay, nothing
    later is written, and the message names step 4 as the one kept."""
    import jax.numpy as jnp

    from polychip.train import step as S

    real = S.train_step_fn

    def poisoned(cfg, rt, opt):
        fn = real(cfg, rt, opt)

        def step(state, batch):
            new, m = fn(state, batch)
            return new, dict(m, loss=jnp.where(state["step"] >= 4, jnp.nan, m["loss"]))

        return step

    monkeypatch.setattr(S, "train_step_fn", poisoned)
    cfg = build_config("tiny", overrides=[f"out_dir={tmp_path}", *COMMON])
    with pytest.raises(NonFiniteError, match=r"step 5: loss nan.*last good checkpoint \(step 4\)"):
        train(cfg, log=lambda *a: None)
    ck = Checkpointer(tmp_path)
    try:
        assert ck.steps() == [2, 4]
    finally:
        ck.close()

"""Resume on a different mesh: train on fsdp=8, resume on 2 slices (dcn) x fsdp 2 x tensor 2; the run
equals the uninterrupted one-device run."""
import jax
import numpy as np

from polychip.config import build_config
from polychip.train.loop import train

COMMON = ["data.max_bytes=200000", "train.steps=6", "train.checkpoint_every=0", "train.warmup_steps=2"]


def _cfg(out, *extra):
    return build_config("tiny", overrides=[f"out_dir={out}", *COMMON, *extra])


def test_resume_from_fsdp8_onto_dcn_fsdp_tensor_equals_uninterrupted(tmp_path):
    quiet = dict(log=lambda *a: None)
    straight = train(_cfg(tmp_path / "straight", "mesh.num_devices=1"), **quiet)
    out = tmp_path / "remesh"
    first = train(_cfg(out, "mesh.fsdp=8"), stop_after=3, **quiet)
    assert first.state["params"]["layers"]["w_up"].sharding.spec[1] == "fsdp"
    second = train(_cfg(out, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "mesh.slices=2"), **quiet)
    assert second.resumed_from == 3
    np.testing.assert_allclose(first.losses + second.losses, straight.losses, rtol=1e-5, atol=1e-5)
    w_up = second.state["params"]["layers"]["w_up"]  # (layers, embed, mlp)
    assert w_up.sharding.spec[1:] == ("fsdp", "tensor")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                 jax.device_get(second.state["params"]), jax.device_get(straight.state["params"]))

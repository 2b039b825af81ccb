"""Checkpoints: exact resume, resume onto another mesh, damaged checkpoints, model mismatch."""
import json
import os

import jax
import numpy as np
import pytest

from polychip.config import build_config
from polychip.train.checkpoint import CheckpointError
from polychip.train.loop import train

COMMON = ["data.max_bytes=200000", "train.steps=8", "train.checkpoint_every=0", "train.warmup_steps=2"]


def _cfg(out, *extra):
    return build_config("tiny", overrides=[f"out_dir={out}", *COMMON, *extra])


def _params(res):
    return jax.device_get(res.state["params"])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    return train(_cfg(out, "mesh.num_devices=1"), log=lambda *a: None)


def test_resume_is_bitwise_identical(tmp_path, straight):
    out = tmp_path / "split"
    first = train(_cfg(out, "mesh.num_devices=1"), log=lambda *a: None, stop_after=4)
    assert first.final_step == 4 and first.steps_run == 4
    logs = []
    second = train(_cfg(out, "mesh.num_devices=1"), log=logs.append)
    assert second.resumed_from == 4 and second.steps_run == 4
    assert any("resumed from checkpoint step 4" in l for l in logs)
    assert first.losses + second.losses == straight.losses  # bitwise on CPU
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), _params(second), _params(straight))
    # metrics.jsonl holds every step exactly once across the two runs
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_resume_onto_another_mesh(tmp_path, straight):
    out = tmp_path / "remesh"
    train(_cfg(out, "mesh.num_devices=1"), log=lambda *a: None, stop_after=4)
    second = train(_cfg(out, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"), log=lambda *a: None)
    assert second.resumed_from == 4
    np.testing.assert_allclose(second.losses, straight.losses[4:], rtol=1e-5, atol=1e-5)
    assert second.state["params"]["layers"]["wq"].sharding.spec[1] == "fsdp"


def _damage_newest(out):
    ck = out / "checkpoints"
    newest = max(int(p.name) for p in ck.iterdir() if p.name.isdigit())
    files = sorted(p for p in (ck / str(newest)).rglob("*") if p.is_file() and p.stat().st_size > 64
                   and "manifest" not in p.name)
    victim = files[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # truncated
    return newest


def test_damaged_checkpoint_falls_back_to_previous(tmp_path):
    out = tmp_path / "damaged"
    train(_cfg(out, "mesh.num_devices=1", "train.checkpoint_every=4"), log=lambda *a: None)
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [4, 8]
    assert _damage_newest(out) == 8
    logs = []
    res = train(_cfg(out, "mesh.num_devices=1", "train.steps=10"), log=logs.append)
    assert res.resumed_from == 4
    assert any("step 8 is damaged" in l and "truncated" in l for l in logs), logs


def test_all_checkpoints_damaged_is_a_clear_error(tmp_path):
    out = tmp_path / "alldamaged"
    train(_cfg(out, "mesh.num_devices=1", "train.steps=4"), log=lambda *a: None)
    _damage_newest(out)
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        train(_cfg(out, "mesh.num_devices=1"), log=lambda *a: None)


def test_checkpoint_from_a_different_model_is_refused(tmp_path):
    out = tmp_path / "other"
    train(_cfg(out, "mesh.num_devices=1", "train.steps=2"), log=lambda *a: None)
    with pytest.raises(CheckpointError, match="different model.*n_layers"):
        train(_cfg(out, "mesh.num_devices=1", "model.n_layers=3"), log=lambda *a: None)


def test_no_temporary_checkpoint_dirs_left(straight, tmp_path):
    out = tmp_path / "clean"
    train(_cfg(out, "mesh.num_devices=1", "train.steps=2"), log=lambda *a: None)
    names = os.listdir(out / "checkpoints")
    assert names == ["2"], names


def _steps(out):
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def test_retrained_step_replaces_the_damaged_one(tmp_path):
    # A damaged newest checkpoint used to stay forever: the retrained step was never saved again
    # (save returned early because the step folder existed), so every rerun retrained the same steps.
    from polychip.train.checkpoint import verify

    out = tmp_path / "replace"
    train(_cfg(out, "mesh.num_devices=1", "train.checkpoint_every=4"), log=lambda *a: None)
    _damage_newest(out)
    again = train(_cfg(out, "mesh.num_devices=1"), log=lambda *a: None)
    assert again.resumed_from == 4 and again.steps_run == 4
    assert _steps(out) == [4, 8] and verify(out / "checkpoints" / "8") is None
    assert not (out / "checkpoints.damaged").exists() or not any((out / "checkpoints.damaged").iterdir())
    third = train(_cfg(out, "mesh.num_devices=1"), log=lambda *a: None)
    assert third.resumed_from == 8 and third.steps_run == 0


def test_checkpoint_without_manifest_is_not_trusted(tmp_path):
    # Manifest deleted and bytes flipped: the corrupted parameters used to load silently.
    out = tmp_path / "nomanifest"
    train(_cfg(out, "mesh.num_devices=1", "train.checkpoint_every=4"), log=lambda *a: None)
    newest = out / "checkpoints" / "8"
    (newest / "polychip.manifest.json").unlink()
    victim = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4] = bytes(b ^ 0xFF for b in data[len(data) // 2: len(data) // 2 + 4])
    victim.write_bytes(bytes(data))
    logs = []
    res = train(_cfg(out, "mesh.num_devices=1"), log=logs.append)
    assert res.resumed_from == 4
    assert any("step 8" in l and "no manifest" in l for l in logs), logs


def test_only_checkpoint_without_manifest_is_a_clear_error(tmp_path):
    out = tmp_path / "onlynomanifest"
    train(_cfg(out, "mesh.num_devices=1", "train.steps=4"), log=lambda *a: None)
    (out / "checkpoints" / "4" / "polychip.manifest.json").unlink()
    with pytest.raises(CheckpointError, match="step 4: no manifest"):
        train(_cfg(out, "mesh.num_devices=1"), log=lambda *a: None)


def test_disk_full_during_save_is_one_checkpoint_error(tmp_path, monkeypatch):
    # A full disk reaches Orbax from TensorStore as ValueError("RESOURCE_EXHAUSTED ..."); it used to end
    # the run with dozens of tracebacks. Checked for real on a 2.5 MB tmpfs; here the error is injected.
    from polychip.train.checkpoint import Checkpointer, verify

    ck = Checkpointer(tmp_path, keep=3)
    tree = {"w": np.arange(6, dtype=np.float32)}
    ck.save(1, tree, tree, {"model": {}})

    def full(step, *a, **kw):
        (ck.dir / f"{step}.orbax-checkpoint-tmp-123").mkdir()
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "w/0": [OS error 28: No space left on device]')

    monkeypatch.setattr(ck.mngr, "save", full)
    with pytest.raises(CheckpointError, match=r"step 2 .* failed \(No space left on device\); earlier checkpoints"):
        ck.save(2, tree, tree, {"model": {}})
    assert sorted(p.name for p in ck.dir.iterdir()) == ["1"]  # the partial save's temp folder is gone
    assert verify(ck.dir / "1") is None
    ck.close()

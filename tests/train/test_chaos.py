"""Chaos: a training subprocess killed with SIGKILL at random points (mid-step, mid-checkpoint) resumes
bit-identically, and no kill loses more than one checkpoint interval of steps.

Bounded: 3 kills, each after a seeded random number of this attempt's steps (plus a random fraction of a
step, so kills also land inside checkpoint writes); each attempt costs a few seconds of CPU.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from polychip.config import build_config
from polychip.train.checkpoint import Checkpointer
from polychip.train.step import StepSpec

STEPS, EVERY, KILLS = 60, 4, 3
ARGS = ["--preset", "tiny", "data.max_bytes=150000", f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}",
        "train.log_every=1", "train.keep_checkpoints=3", "mesh.num_devices=1"]
RUN = "from polychip.cli import main; raise SystemExit(main())"


def _train(out: Path) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.Popen([sys.executable, "-c", RUN, "train", "--out", str(out), *ARGS], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _logged_steps(out: Path) -> list[int]:
    """Steps in metrics.jsonl, in the order they were logged (a resumed run logs from its checkpoint on)."""
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line)["step"] for line in lines if line.strip().endswith("}")]


def _good_steps(out: Path, spec: StepSpec) -> tuple[int, dict] | None:
    target = spec.sharded_abstract_state()
    ckpt = Checkpointer(out)
    try:
        got = ckpt.restore(target["params"], target["opt_state"], log=lambda *a: None)
    finally:
        ckpt.close()
    return None if got is None else (got[0], jax.device_get(got[1]))


def test_sigkill_at_random_points_resumes_bit_identically(tmp_path):
    spec = StepSpec.build(build_config("tiny", overrides=ARGS[2:]), devices=jax.devices()[:1])
    ref_out, out = tmp_path / "straight", tmp_path / "killed"
    ref = _train(ref_out)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()

    rng, killed_at = random.Random(1234), []
    for kill in range(KILLS):
        before, after = len(_logged_steps(out)), rng.randint(1, 12)
        p = _train(out)
        deadline = time.monotonic() + 240
        while len(_logged_steps(out)) < before + after and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)  # until this attempt has done `after` steps (it logs every step)
        time.sleep(rng.uniform(0.0, 0.05))
        if p.poll() is not None:
            break  # finished before the kill: nothing left to interrupt
        p.send_signal(signal.SIGKILL)
        p.wait()
        logged = _logged_steps(out)[-1]
        restored = _good_steps(out, spec)
        kept = restored[0] if restored else 0
        killed_at.append((logged, kept))
        # a kill loses at most the steps since the last checkpoint that finished writing
        assert logged - kept <= EVERY, f"kill {kill}: logged step {logged}, newest good checkpoint {kept}"

    # the kills really interrupted training part-way (else this test would prove nothing)
    assert len(killed_at) >= 2 and all(0 < s < STEPS for s, _ in killed_at), killed_at
    last = _train(out)
    assert last.wait(timeout=300) == 0, last.stderr.read()
    want, got = _good_steps(ref_out, spec), _good_steps(out, spec)
    assert want[0] == got[0] == STEPS
    print("killed at (last logged step, newest good checkpoint):", killed_at)
    jax.tree.map(np.testing.assert_array_equal, got[1], want[1])

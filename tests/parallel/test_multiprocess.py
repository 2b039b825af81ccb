"""2 processes x 4 CPU devices over loopback (jax.distributed, gloo) == 1 process x 8 devices."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ARGS = ["--preset", "tiny", "data.max_bytes=200000", "train.steps=6", "train.checkpoint_every=0",
        "train.log_every=1", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = ""
    for k in ("COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID", "MASTER_ADDR", "WORLD_SIZE", "RANK"):
        env.pop(k, None)
    return env


def _losses(out):
    return [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.multiprocess
def test_two_processes_match_one(tmp_path):
    one = tmp_path / "one"
    r = subprocess.run([sys.executable, "-m", "polychip.cli", "train", "--out", str(one), "--cpu-devices", "8", *ARGS],
                       capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]

    two = tmp_path / "two"
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "polychip.cli", "train", "--out", str(two), "--cpu-devices", "4",
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), *ARGS],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    assert "x 2 process(es)" in outs[0][0]
    np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5, atol=1e-5)
    # Process 0 alone writes the run's records: one TensorBoard file, one start and one end event.
    assert len(list(two.glob("events.out.tfevents.*"))) == 1
    events = [json.loads(l)["event"] for l in (two / "events.jsonl").read_text().splitlines()]
    assert events.count("start") == 1 and events.count("end") == 1

    # One checkpoint, restorable by a single process with a different device count.
    assert sorted(d.name for d in (two / "checkpoints").iterdir() if d.name.isdigit()) == ["6"]
    code = (
        "import jax, numpy as np\n"
        "from polychip.generate import load_for_inference\n"
        f"cfg, p, tok = load_for_inference({str(two)!r})\n"
        f"cfg1, p1, _ = load_for_inference({str(one)!r})\n"
        "d = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p1)))\n"
        "print('maxdiff', d)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert float(r.stdout.split("maxdiff")[1]) < 1e-4

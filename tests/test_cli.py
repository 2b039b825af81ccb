"""The polychip command line end to end: train -> generate, preemption, and user mistakes."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from polychip.cli import main

PY = sys.executable


def _env():
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = ""  # one device: the CLI default mesh uses all devices
    return env


def _cli(*args, timeout=300):
    return subprocess.run([PY, "-m", "polychip.cli", *args], capture_output=True, text=True, timeout=timeout, env=_env())


def test_train_then_generate(tmp_path):
    out = tmp_path / "run"
    r = _cli("train", "--preset", "tiny", "--out", str(out), "data.max_bytes=200000", "train.steps=6")
    assert r.returncode == 0, r.stderr
    assert "MFU" in r.stdout and "tok/s" in r.stdout
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [1, 2, 3, 4, 5, 6]
    assert all(k in recs[-1] for k in ("loss", "grad_norm", "lr", "tokens_per_s", "step_time_s", "mfu"))
    assert recs[-1]["mfu"] is not None and 0 < recs[-1]["mfu"] < 1
    r = _cli("generate", "--checkpoint", str(out), "--prompt", "def ", "--max-tokens", "12", "--json")
    assert r.returncode == 0, r.stderr
    g = json.loads(r.stdout)
    assert len(g["tokens"]) == 12 and g["finish_reason"] == "length" and g["text"]


def test_sigterm_writes_a_checkpoint_and_the_next_run_resumes(tmp_path):
    out = tmp_path / "pre"
    args = [PY, "-m", "polychip.cli", "train", "--preset", "tiny", "--out", str(out), "data.max_bytes=200000",
            "train.steps=100000", "train.checkpoint_every=0", "train.log_every=1"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, stderr
    assert "checkpoint written at step" in stdout
    saved = [int(d.name) for d in (out / "checkpoints").iterdir() if d.name.isdigit()]
    assert len(saved) == 1 and saved[0] >= 3
    r = _cli("train", "--preset", "tiny", "--out", str(out), "data.max_bytes=200000", f"train.steps={saved[0] + 2}",
             "train.checkpoint_every=0")
    assert r.returncode == 0, r.stderr
    assert f"resumed from checkpoint step {saved[0]}" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["train", "model.foo=1"], "unknown config key 'model.foo'"),
    (["train", "model.n_heads=6", "model.n_kv_heads=4"], "not a multiple of model.n_kv_heads"),
    (["train", "--preset", "tiny", "train.seq_len=4096"], "exceeds model.max_seq_len"),
    (["train", "--preset", "tiny", "mesh.data=3", "mesh.fsdp=1"], "has 3 devices but"),
    (["train", "--preset", "tiny", "data.source=/no/such/file.txt"], "/no/such/file.txt"),
    (["train", "--config", "/no/such.yaml"], "not found"),
    (["train", "train.lr=fast"], "train.lr must be a number"),
    (["generate", "--checkpoint", "/no/such/dir", "--prompt", "x"], "not found"),
])
def test_user_mistakes_are_one_line_and_exit_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err.startswith("polychip: error:")


def test_vocab_mismatch_is_reported(tmp_path, tiny_run, capsys):
    # A tokenizer with 512 tokens cannot drive a model with 300 embedding rows.
    code = main(["train", "--preset", "tiny", "--out", str(tmp_path / "v"), f"data.tokenizer={tiny_run}/tokenizer.json",
                 "model.vocab_size=300", "data.max_bytes=100000"])
    assert code == 2
    assert "vocab" in capsys.readouterr().err


def test_help_lists_every_option():
    r = _cli("train", "--help")
    assert r.returncode == 0 and "--preset" in r.stdout and "--coordinator" in r.stdout
    r = _cli("train", "--help-config")
    assert "model.n_kv_heads" in r.stdout and "train.grad_accum" in r.stdout and "Micro-batches" in r.stdout


def test_overrides_work_in_any_position():
    # `--out R a=1` used to fail with "unrecognized arguments"; order is kept (later wins).
    from polychip.cli import build_parser, parse_args

    args = parse_args(build_parser(), ["train", "model.n_layers=3", "--out", "R", "train.steps=4", "--preset", "tiny",
                                       "model.n_layers=5"])
    assert args.out == "R" and args.preset == "tiny"
    assert args.overrides == ["model.n_layers=3", "train.steps=4", "model.n_layers=5"]
    args = parse_args(build_parser(), ["compile", "--model", "tiny", "--target", "v5e:2x2", "train.remat=full",
                                       "--batch", "8", "train.grad_accum=2"])
    assert args.overrides == ["train.remat=full", "train.grad_accum=2"] and args.batch == 8


def test_plain_errors_keep_their_one_line_and_debug_reraises(capsys):
    from polychip.cli import guarded

    class Args:
        debug = False

    def boom(_):
        raise OSError(28, "No space left on device", "/run/x")

    assert guarded(boom, Args()) == 2
    assert capsys.readouterr().err == "polychip: error: No space left on device: /run/x\n"
    Args.debug = True
    with pytest.raises(OSError):
        guarded(boom, Args())

    def bug(_):
        raise ZeroDivisionError("a real bug")

    Args.debug = False
    with pytest.raises(ZeroDivisionError):  # bugs are not user errors: the traceback must show
        guarded(bug, Args())

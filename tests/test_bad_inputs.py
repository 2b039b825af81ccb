"""A hostile user's sweep over the train, bench, compile, plan, generate and serve CLIs: every bad input gives exit 2,
one `error:` line on stderr and no traceback (issue 10). Cases run in-process through
polychip.cli.main and fail before anything compiles, so the sweep stays fast. generate and serve cases use the
session's tiny run folder and fail before generating or binding a port. (The HTTP API's own bad-request
sweep is tests/serve/test_fuzz.py: 4xx, never 5xx.)
"""
from __future__ import annotations

import errno
import re

import pytest

from polychip.cli import main

FLEET = """\
start: 2026-09-01
horizon: 30d
pools:
  - {name: gcp-v6e, chip: tpu-v6e, count: 64, cloud: gcp, region: us-east5}
  - {name: aws-h100, chip: h100, count: 32, cloud: aws, region: us-east-1}
workloads:
  - {name: chat-8b, kind: serve, model: llama3-8b, rate: 2/s, prompt_tokens: 1800, output_tokens: 128, tpot: 50ms}
"""

# Nine levels of nine-fold aliases: 9**9 values once expanded (a "billion laughs" file).
ALIAS_BOMB = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))

BINARY = bytes(range(256)) * 8
LATIN1 = "pools: []\n# caf\xe9\n".encode("latin-1")


def _files(d):
    """Every input file the cases refer to, written into `d`; returns {name: path}."""
    d.mkdir(exist_ok=True)
    texts = {
        "fleet.yaml": FLEET,
        "nan.yaml": FLEET.replace("count: 64", "count: .nan"),
        "inf.yaml": FLEET.replace("count: 64", "count: .inf"),
        "neg.yaml": FLEET.replace("count: 64", "count: -3"),
        "dup.yaml": FLEET.replace("horizon: 30d\n", "horizon: 30d\nhorizon: 40d\n"),
        "deep.yaml": "pools: " + "[" * 500 + "]" * 500 + "\n",
        "bomb.yaml": ALIAS_BOMB,
        "cfg_dup.yaml": "train:\n  lr: 0.1\n  lr: 0.2\n",
        "cfg_list.yaml": "- 1\n- 2\n",
        "cfg_bomb.yaml": ALIAS_BOMB,
        "cfg_nan.yaml": "train:\n  lr: .nan\n",
        "afile": "not a folder\n",
        "hf_bad/config.json": "{not json",
        "run_bad/config.yaml": "model: [unclosed\n",
        "recs_nan/r.json": '{"chip": "h100", "model": "llama3-8b", "mode": "train", "chips": NaN, "source": "measured", '
                           '"batch": 8, "seq": 2048, "step_time_s": 1.0}',
        "recs_inf/r.json": '{"chip": "h100", "model": "llama3-8b", "mode": "train", "chips": 8, "source": "measured", '
                           '"batch": 8, "seq": 2048, "step_time_s": Infinity}',
    }
    for name, text in texts.items():
        (d / name).parent.mkdir(exist_ok=True)
        (d / name).write_text(text)
    for name in ("binary.yaml", "binary.txt"):
        (d / name).write_bytes(BINARY)
    (d / "latin1.yaml").write_bytes(LATIN1)
    (d / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (d / "folder").mkdir(exist_ok=True)
    (d / "recs_bin").mkdir(exist_ok=True)
    (d / "recs_bin" / "r.json").write_bytes(BINARY)
    return {p.name: str(p) for p in d.iterdir()}


T = ["train", "--preset", "tiny"]
B = ["bench", "train", "--preset", "tiny"]
C = ["compile", "--model", "tiny", "--target", "v5e:2x2"]
G = ["generate", "--checkpoint", "{run}"]
S = ["serve", "--checkpoint", "{run}"]
TRAIN_OVERRIDES = [
    ("train.lr=.nan", "train.lr"), ("train.lr=-1", "train.lr"), ("train.lr=inf", "train.lr"),
    ("model.rope_theta=-5", "model.rope_theta"), ("train.b1=2", "train.b1"), ("train.b2=-0.1", "train.b2"),
    ("train.checkpoint_every=-1", "train.checkpoint_every"), ("train.log_every=-1", "train.log_every"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints"), ("train.keep_checkpoints=-3", "train.keep_checkpoints"),
    ("train.eval_every=-2", "train.eval_every"), ("train.warmup_steps=-1", "train.warmup_steps"),
    ("train.grad_clip=-1", "train.grad_clip"), ("train.eps=0", "train.eps"),
    ("train.weight_decay=.nan", "train.weight_decay"), ("train.min_lr_ratio=2", "train.min_lr_ratio"),
    ("train.steps=-1", "train.steps"), ("train.batch_size=0", "train.batch_size"),
    ("train.seq_len=0", "train.seq_len"), ("train.grad_accum=0", "train.grad_accum"),
    ("model.n_layers=0", "model.n_layers"), ("model.n_layers=1e400", "model.n_layers"),
    ("model.d_model=2.5", "model.d_model"), ("model.norm_eps=0", "model.norm_eps"),
    ("model.vocab_size=-1", "model.vocab_size"), ("model.init_std=-.inf", "model.init_std"),
    ("data.eval_fraction=1.5", "data.eval_fraction"), ("data.max_bytes=-1", "data.max_bytes"),
    ("data.seed=-1", "data.seed"), ("data.source=null", "data.source"), ("data.source=[&a x, *a]", "aliases"),
    ("mesh.fsdp=0", "mesh.fsdp"), ("mesh.data=-2", "mesh.data"), ("mesh.num_devices=-1", "mesh.num_devices"),
    ("distributed.cpu_devices=-1", "distributed.cpu_devices"), ("train.remat=sometimes", "train.remat"),
    ("train.param_dtype=float8", "train.param_dtype"), ("model.tie_embeddings=maybe", "model.tie_embeddings"),
    ("model.foo=1", "model.foo"), ("train.lr=fast", "train.lr"),
]

CASES = [
    *[pytest.param([*T, ov], needle, id=f"train-{ov}") for ov, needle in TRAIN_OVERRIDES],
    pytest.param([*T, "--out", "{d}/r", "train.lr=-1"], "train.lr", id="train-override-after-out"),
    pytest.param([*T, "--cpu-devices", "-1"], "distributed.cpu_devices", id="train-cpu-devices-neg"),
    pytest.param([*T, "--cpu-devices", "abc"], "invalid int", id="train-cpu-devices-text"),
    pytest.param([*T, "--num-processes", "-1"], "distributed.num_processes", id="train-num-processes-neg"),
    pytest.param([*T, "--bogus"], "unrecognized arguments", id="train-unknown-flag"),
    pytest.param([*T, "--out", "{d}/r", "stray"], "stray", id="train-stray-positional"),
    pytest.param(["train", "--preset", "nosuch"], "invalid choice", id="train-unknown-preset"),
    pytest.param([*T, "--config", "{cfg_dup.yaml}"], "duplicate key 'lr'", id="config-duplicate-key"),
    pytest.param([*T, "--config", "{cfg_list.yaml}"], "mapping", id="config-not-a-mapping"),
    pytest.param([*T, "--config", "{cfg_bomb.yaml}"], "aliases", id="config-alias-bomb"),
    pytest.param([*T, "--config", "{cfg_nan.yaml}"], "train.lr", id="config-nan"),
    pytest.param([*T, "--config", "{binary.yaml}"], "binary", id="config-binary"),
    pytest.param([*T, "--config", "{latin1.yaml}"], "not UTF-8", id="config-latin1"),
    pytest.param([*T, "--config", "{d}/missing.yaml"], "not found", id="config-missing"),
    pytest.param([*T, "--out", "{afile}"], "is a file", id="train-out-is-a-file"),
    pytest.param([*T, "--out", "{afile}/run"], "is a file", id="train-out-under-a-file"),
    pytest.param([*T, "--out", "{d}/r", "data.source={binary.txt}", "mesh.num_devices=1"], "looks binary",
                 id="train-binary-data"),
    pytest.param([*T, "--out", "{d}/r", "data.source={latin1.txt}", "mesh.num_devices=1"], "not UTF-8",
                 id="train-latin1-data"),
    pytest.param([*T, "--out", "{d}/r", "data.source={d}/none.txt"], "not found", id="train-missing-data"),
    pytest.param(["frobnicate"], "invalid choice", id="unknown-command"),
    pytest.param([*B, "--steps", "0"], "--steps", id="bench-steps-0"),
    pytest.param([*B, "--warmup", "-1"], "--warmup", id="bench-warmup-neg"),
    pytest.param([*B, "train.lr=.nan"], "train.lr", id="bench-nan-lr"),
    pytest.param(["compile", "--model", "tiny", "--target", "nosuch:1"], "unknown target", id="compile-bad-target"),
    pytest.param(["compile", "--model", "tiny", "--target", "v5e:0x2"], ">= 1", id="compile-zero-topology"),
    pytest.param([*C, "--mesh", "fsdp=0"], "positive integer", id="compile-mesh-zero"),
    pytest.param([*C, "--mesh", "foo=4"], "unknown axis", id="compile-mesh-axis"),
    pytest.param([*C, "--mesh", "fsdp=3"], "uses 3 devices", id="compile-mesh-count"),
    pytest.param([*C, "--batch", "0"], "--batch", id="compile-batch-0"),
    pytest.param([*C, "--seq", "-4"], "--seq", id="compile-seq-neg"),
    pytest.param([*C, "--mode", "serve", "--output-tokens", "0"], "--output-tokens", id="compile-output-0"),
    pytest.param([*C, "--search", "--max-trials", "0"], "--max-trials", id="compile-trials-0"),
    pytest.param([*C, "--json", "{folder}"], "is a folder", id="compile-json-folder"),
    pytest.param([*C, "--record", "{afile}/rec.json"], "is a file", id="compile-record-under-file"),
    pytest.param([*C, "train.lr=.nan"], "train.lr", id="compile-nan-override"),
    pytest.param([*C, "model.n_layers=0"], "model.n_layers", id="compile-override-after-target"),
    pytest.param([*C, "--mode", "sideways"], "invalid choice", id="compile-bad-mode"),
    pytest.param(["plan", "{d}/nofleet.yaml"], "not found", id="plan-missing-fleet"),
    pytest.param(["plan", "{binary.yaml}"], "binary", id="plan-binary-fleet"),
    pytest.param(["plan", "{latin1.yaml}"], "not UTF-8", id="plan-latin1-fleet"),
    pytest.param(["plan", "{nan.yaml}"], "count", id="plan-count-nan"),
    pytest.param(["plan", "{inf.yaml}"], "count", id="plan-count-inf"),
    pytest.param(["plan", "{neg.yaml}"], "count", id="plan-count-negative"),
    pytest.param(["plan", "{dup.yaml}"], "duplicate key 'horizon'", id="plan-duplicate-key"),
    pytest.param(["plan", "{deep.yaml}"], "nested", id="plan-deep-nesting"),
    pytest.param(["plan", "{bomb.yaml}"], "aliases", id="plan-alias-bomb"),
    *[pytest.param(["plan", "{fleet.yaml}", *extra], needle, id=f"plan-{name}") for name, extra, needle in [
        ("catalog-alias-bomb", ["--catalog", "{bomb.yaml}"], "aliases"),
        ("catalog-binary", ["--catalog", "{binary.yaml}"], "binary"),
        ("catalog-latin1", ["--catalog", "{latin1.yaml}"], "not UTF-8"),
        ("json-folder", ["--json", "{folder}"], "is a folder"),
        ("report-file", ["--report", "{afile}"], "is a file"),
        ("launch-file", ["--launch", "{afile}"], "is a file"),
        ("scale-negative", ["--scale-pool", "aws-h100=-2"], "positive"),
        ("scale-nan", ["--scale-pool", "aws-h100=nan"], "positive"),
        ("scale-zero", ["--scale-pool", "aws-h100=0"], "positive"),
        ("scale-unknown", ["--scale-pool", "nosuch=2"], "no pool named"),
        ("gap-negative", ["--gap", "-1"], "--gap"),
        ("time-limit-negative", ["--time-limit", "-5"], "--time-limit"),
        ("time-limit-nan", ["--time-limit", "nan"], "--time-limit"),
        ("power-cap-negative", ["--power-cap=-5MW"], "power"),
        ("record-nan", ["--records", "{recs_nan}"], "chips"),
        ("record-inf", ["--records", "{recs_inf}"], "step_time_s"),
        ("record-binary", ["--records", "{recs_bin}"], "r.json"),
        ("records-missing", ["--records", "{d}/norecs"], "not found"),
        ("bad-objective", ["--objective", "vibes"], "invalid choice"),
    ]],
    *[pytest.param([*G, *extra], needle, id=f"generate-{name}") for name, extra, needle in [
        ("temperature-neg", ["--prompt", "hi", "--temperature", "-1"], "temperature"),
        ("temperature-nan", ["--prompt", "hi", "--temperature", "nan"], "temperature"),
        ("top-p-0", ["--prompt", "hi", "--top-p", "0"], "top_p"),
        ("top-p-big", ["--prompt", "hi", "--top-p", "1.5"], "top_p"),
        ("top-k-neg", ["--prompt", "hi", "--top-k", "-1"], "top_k"),
        ("max-tokens-neg", ["--prompt", "hi", "--max-tokens", "-1"], "max_tokens"),
        ("prompt-file-binary", ["--prompt-file", "{binary.txt}"], "UTF-8"),
        ("prompt-file-latin1", ["--prompt-file", "{latin1.txt}"], "UTF-8"),
        ("prompt-file-missing", ["--prompt-file", "{d}/nope.txt"], "cannot read"),
        ("prompt-file-folder", ["--prompt-file", "{folder}"], "--prompt-file"),
        ("no-prompt", [], "--prompt"),
        ("dtype", ["--prompt", "hi", "--dtype", "int4"], "invalid choice"),
    ]],
    *[pytest.param(["generate", "--checkpoint", ck, "--prompt", "hi"], needle, id=f"generate-checkpoint-{name}")
      for name, ck, needle in [("missing", "{d}/nockpt", "not found"), ("file", "{afile}", "afile"),
                               ("empty-folder", "{folder}", "neither"), ("bad-hf-config", "{hf_bad}", "config.json"),
                               ("bad-run-config", "{run_bad}", "config.yaml")]],
    *[pytest.param([*S, *extra], needle, id=f"serve-{name}") for name, extra, needle in [
        ("port-neg", ["--port", "-1"], "--port"), ("port-big", ["--port", "70000"], "--port"),
        ("max-batch-0", ["--max-batch", "0"], "max_batch"), ("page-size-0", ["--page-size", "0"], "page_size"),
        ("kv-blocks-0", ["--kv-blocks", "0"], "kv_blocks"),
        ("kv-fraction", ["--kv-memory-fraction", "2"], "kv_memory_fraction"),
        ("prefill-chunk-0", ["--prefill-chunk", "0"], "prefill_chunk"), ("max-queue-0", ["--max-queue", "0"], "max_queue"),
        ("prefill-rows-0", ["--prefill-rows", "0"], "prefill_rows"),
        ("request-bytes-0", ["--max-request-bytes", "0"], "--max-request-bytes"),
        ("tokens-limit-neg", ["--max-tokens-limit", "-1"], "--max-tokens-limit"),
        ("empty-api-key", ["--api-key", " "], "--api-key"), ("dtype", ["--dtype", "fp8"], "invalid choice"),
        ("profile-dir-file", ["--profile-dir", "{afile}"], "--profile-dir"),
    ]],
    pytest.param(["serve", "--checkpoint", "{d}/nockpt"], "not found", id="serve-checkpoint-missing"),
    pytest.param(["serve", "--checkpoint", "{hf_bad}"], "config.json", id="serve-checkpoint-bad-hf"),
]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, out, err, needle=""):
    assert "Traceback" not in out + err, err
    assert code == 2, (code, err)
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and ": error: " in lines[0] and lines[0].startswith("polychip"), err
    assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_run):
    d = tmp_path_factory.mktemp("bad")
    files = _files(d)
    files.update({sub: str(d / sub) for sub in ("hf_bad", "run_bad")})
    return {"d": str(d), "run": str(tiny_run), **files}


@pytest.mark.parametrize("argv,needle", CASES)
def test_bad_input_is_one_line_exit_2(argv, needle, inputs, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # runs/<preset> defaults land here, not in the checkout
    monkeypatch.setenv("POLYCHIP_CACHE_DIR", str(tmp_path / "cache"))
    argv = [re.sub(r"\{([^}]+)\}", lambda m: inputs[m.group(1)], a) for a in argv]
    assert_one_line_error(*run_cli(argv, capsys), needle)


def test_a_bad_kernel_thread_cap_is_one_line_exit_2(inputs, capsys, monkeypatch):
    # Read when the CPU matmul kernel is traced (a float32 model decodes through it on CPU), so this one
    # compiles the tiny model first.
    from polychip.kernels.quant_matmul import cpu_ffi

    if cpu_ffi.ensure_registered() is not None:
        pytest.skip(f"the CPU kernel is not used here: {cpu_ffi.ensure_registered()}")
    monkeypatch.setenv(cpu_ffi.THREADS_ENV, "two")
    argv = ["generate", "--checkpoint", inputs["run"], "--prompt", "hi", "--max-tokens", "2"]
    assert_one_line_error(*run_cli(argv, capsys), "POLYCHIP_CPU_KERNEL_THREADS='two'")


def test_the_sweep_is_large_enough():
    assert len(CASES) >= 80


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(Exception, match="train.lr"):
        main(["--debug", "train", "--preset", "tiny", "train.lr=-1"])
    with pytest.raises(Exception, match="train.lr"):
        main(["train", "--preset", "tiny", "train.lr=-1", "--debug"])


def test_read_only_run_folder(tmp_path, capsys, monkeypatch):
    # Running as root ignores permission bits, so simulate what a read-only mount reports.
    import polychip.files as files

    real = files.os.access
    monkeypatch.setattr(files.os, "access", lambda p, mode: False if str(p).startswith(str(tmp_path)) else real(p, mode))
    assert_one_line_error(*run_cli([*T, "--out", str(tmp_path / "ro" / "run")], capsys), "not writable")


def test_disk_full_during_a_checkpoint_keeps_the_earlier_ones(tmp_path, capsys, monkeypatch):
    from polychip.train import checkpoint
    from polychip.train.checkpoint import verify

    real, calls = checkpoint.atomic_write_json, []

    def full_on_second(path, obj, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, obj, **kw)

    monkeypatch.setattr(checkpoint, "atomic_write_json", full_on_second)
    out = tmp_path / "full"
    argv = [*T, "--out", str(out), "train.steps=4", "train.checkpoint_every=2", "data.max_bytes=100000",
            "mesh.num_devices=1"]
    assert_one_line_error(*run_cli(argv, capsys), "No space left on device")
    assert verify(out / "checkpoints" / "2") is None

"""`polychip compile` through polychip.cli.main: bad input exits 2 with one line; modelled targets work without a compiler."""
import json

import pytest

from polychip.cli import main


@pytest.mark.parametrize("argv,needle", [
    (["--model", "tiny", "--target", "v9:2x2"], "unknown target 'v9:2x2'; valid: TPU topologies"),
    (["--model", "tiny", "--target", "v5e:2x2", "--mesh", "fsdp=3"], "valid (fsdp x tensor) meshes: fsdp=4; fsdp=2,tensor=2; tensor=4"),
    (["--model", "tiny", "--target", "v5e:2x2", "--batch", "6"], "valid batches: 4, 8, 12, 16"),
    (["--model", "tiny", "--target", "v5e:2x2", "--mesh", "data=2,fsdp=2", "--batch", "2", "train.grad_accum=2"],
     "micro-batch 1 with grad_accum=2"),
    (["--model", "tiny", "--target", "h100:8", "train.remat=sometimes"], "train.remat must be one of none, dots"),
    (["--model", "tiny", "--target", "v5e:2x2", "--mode", "serve", "--seq", "100", "--output-tokens", "64"],
     "must fit the model's context"),
])
def test_bad_input_exits_2(argv, needle, capsys):
    assert main(["compile", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("polychip: error:") and needle in err and "\n" not in err


def test_modelled_gpu_target(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["compile", "--model", "llama3-8b", "--target", "h100:8", "--batch", "32", "--seq", "4096",
                 "train.compute_dtype=bfloat16", "train.remat=full", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["target"]["kind"] == "modelled"
    figs = rep["steps"][0]["figures"]
    assert {f["source"] for f in figs.values()} <= {"modelled", "model", "estimate"}
    assert figs["step_time"]["source"] == "estimate" and 0 < figs["mfu"]["value"] <= 1
    assert rep["measured"] is None  # no GPU on this host: nothing measured, nothing pretended
    assert "modelled" in capsys.readouterr().out


def test_modelled_serve_and_search(tmp_path):
    out = tmp_path / "s.json"
    assert main(["compile", "--model", "llama3-8b", "--target", "trn2:16", "--mode", "serve", "--batch", "16",
                 "--seq", "2048", "--json", str(out)]) == 0
    steps = {s["name"]: s for s in json.loads(out.read_text())["steps"]}
    assert set(steps) == {"prefill", "decode"}
    out2 = tmp_path / "search.json"
    main(["compile", "--model", "llama3-70b", "--target", "h100:8", "--batch", "32", "--seq", "4096", "--search",
          "train.compute_dtype=bfloat16", "--json", str(out2)])
    rows = json.loads(out2.read_text())["search"]
    assert len(rows) >= 3
    ok = [r for r in rows if not r["error"]]
    # ranked: every fitting row before every non-fitting one, fitting rows by step time
    fits = [r["fits"] for r in ok]
    assert fits == sorted(fits, reverse=True)
    times = [r["step_time"] for r in ok if r["fits"]]
    assert times == sorted(times)


def test_gpu_compile_and_plan_give_one_step_time(tmp_path):
    """The planner's estimate for llama3-8b training on 8 H100s, and `compile` of the configuration it chose
    (its mesh, remat, micro-batches, bf16 weights as launch.py writes): the same step time."""
    from polychip.config import MODEL_PRESETS
    from polychip.hardware import load_catalog
    from polychip.plan import TrainWorkload
    from polychip.plan.perf import PerfModel
    from polychip.plan.published import published_records

    cat = load_catalog()
    w = TrainWorkload("t", MODEL_PRESETS["llama3-8b"], "llama3-8b", 1e12, 4096, 32, remat="full")
    e = PerfModel(published_records(), cat).train(w, cat["h100"], 8)
    assert e.source == "estimate" and e.layout.stage == e.layout.context == 1
    mesh = f"data={e.layout.data},fsdp={e.layout.fsdp},tensor={e.layout.tensor}"
    out = tmp_path / "r.json"
    assert main(["compile", "--model", "llama3-8b", "--target", "h100:8", "--batch", "32", "--seq", "4096",
                 "--mesh", mesh, "train.compute_dtype=bfloat16", "train.remat=full", "train.param_dtype=bfloat16",
                 f"train.grad_accum={e.grad_accum}", "--json", str(out)]) == 0
    step = json.loads(out.read_text())["steps"][0]["figures"]["step_time"]
    assert step["value"] == pytest.approx(e.step_time_s, rel=1e-9)


def test_a_compiler_failure_is_one_line_not_a_traceback(monkeypatch, capsys):
    """A program the TPU compiler fails on (libtpu 0.0.42.1: host offload inside a pipeline stage, e.g.
    `--model 1b --target 'v6e:2x2*2' --mesh stage=2,fsdp=2,context=2 train.remat=offload_layer_input`) gives
    no fit and no estimate: one line and exit 2, with the compiler's message cut to its two ends."""
    import jax

    from polychip.compile import lower

    class Lowered:
        def compile(self, compiler_options=None):
            raise jax.errors.JaxRuntimeError("INTERNAL: during context [post-optimization]: " + "x" * 2000
                                             + " Bitcast cannot have different memory spaces")

    class Jitted:
        def lower(self, *args):
            return Lowered()

    real = lower._compile
    monkeypatch.setattr(lower, "_compile", lambda name, jitted, *a, **kw: real(name, Jitted(), *a, **kw))
    assert main(["compile", "--model", "tiny", "--target", "v5e:2x2", "--no-cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("polychip: error: the XLA TPU compiler failed on this configuration") and "\n" not in err
    assert "INTERNAL: during context" in err and "different memory spaces" in err and len(err) < 800


def test_hbm_figure_is_the_buffer_assignment_and_a_users_dump_is_kept(tmp_path):
    """`compile` reads the HBM the TPU compiler assigns from the memory-usage report it dumps: into a
    temporary folder it deletes, or into the folder the user's XLA_FLAGS names, which is left in place."""
    import os
    import subprocess
    import sys

    dump, out = tmp_path / "dump", tmp_path / "r.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", POLYCHIP_CACHE_DIR=str(tmp_path / "cache"),
               XLA_FLAGS=f"--xla_dump_to={dump} --xla_dump_hlo_as_text")
    res = subprocess.run([sys.executable, "-c", "import sys; from polychip.cli import main; sys.exit(main())",
                          "compile", "--model", "tiny", "--target", "v5e:2x2", "--json", str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert list(dump.glob("*memory-usage-report.txt"))
    f = json.loads(out.read_text())["steps"][0]["figures"]
    assert "buffer assignment" in f["hbm_used_per_device"]["note"]
    assert 0 < f["hbm_used_per_device"]["value"] <= f["hbm_sum_per_device"]["value"]

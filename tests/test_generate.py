"""generate: KV-cached decoding equals uncached greedy; sampling controls behave."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polychip.config import ConfigError, ModelConfig
from polychip.generate import Generator, SamplingParams, generate_uncached, load_for_inference, sample
from polychip.model import transformer as T


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=101, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=96, init_std=0.3)
    return cfg, T.init_params(cfg, jax.random.key(3))


def test_cached_greedy_equals_uncached(model):
    cfg, p = model
    g = Generator(cfg, p)
    for prompt in ([5], [1, 2, 3, 4, 5, 6, 7], list(range(10, 40))):
        out, reason = g.generate_ids(prompt, SamplingParams(temperature=0, max_tokens=24))
        ref = generate_uncached(cfg, p, prompt, 24)
        assert out == ref and reason == "length"
        assert len(set(out)) > 3  # a non-degenerate sequence, so the comparison means something


def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
    cfg, p = model
    g = Generator(cfg, p)
    prompt = [3, 1, 4, 1, 5]
    a = g.generate_ids(prompt, SamplingParams(temperature=1.0, seed=7, max_tokens=20))[0]
    b = g.generate_ids(prompt, SamplingParams(temperature=1.0, seed=7, max_tokens=20))[0]
    c = g.generate_ids(prompt, SamplingParams(temperature=1.0, seed=8, max_tokens=20))[0]
    assert a == b and a != c
    greedy = g.generate_ids(prompt, SamplingParams(temperature=0, max_tokens=20))[0]
    assert g.generate_ids(prompt, SamplingParams(temperature=1.5, top_k=1, seed=1, max_tokens=20))[0] == greedy
    assert g.generate_ids(prompt, SamplingParams(temperature=1.5, top_p=1e-6, seed=1, max_tokens=20))[0] == greedy


def test_sample_filters_statistically():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000, jnp.float32))
    ones = jnp.ones((4000,))
    draw = lambda k, p: np.asarray(sample(logits, jax.random.key(0), ones, jnp.full((4000,), k, jnp.int32),
                                          jnp.full((4000,), p, jnp.float32)))
    assert set(draw(2, 1.0)) == {0, 1}
    assert set(draw(0, 0.7)) == {0, 1}  # 0.5 < 0.7, 0.5+0.3 >= 0.7
    freq = np.bincount(draw(0, 1.0), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 1.0), (0, 0.9)])
def test_sample_per_row_keys_draw_as_rows_alone(top_k, top_p):
    """The serving step passes one key per row: each row draws what a batch of one with its key draws,
    in every branch (plain draw, top-k / top-p sort), and temperature-0 rows stay greedy among them."""
    logits = jax.random.normal(jax.random.key(1), (6, 50))
    keys = jax.random.split(jax.random.key(2), 6)
    temp = jnp.array([0.8, 0.0, 1.2, 0.8, 0.0, 2.0])
    tk, tp = jnp.full((6,), top_k, jnp.int32), jnp.full((6,), top_p)
    rows = np.asarray(sample(logits, keys, temp, tk, tp))
    alone = [int(sample(logits[i:i + 1], keys[i], temp[i:i + 1], tk[i:i + 1], tp[i:i + 1])[0]) for i in range(6)]
    assert rows.tolist() == alone
    assert rows[1] == int(jnp.argmax(logits[1])) and rows[4] == int(jnp.argmax(logits[4]))


def test_budget_eos_and_context_limits(model):
    cfg, p = model
    g = Generator(cfg, p)
    greedy, _ = g.generate_ids([1, 2, 3], SamplingParams(temperature=0, max_tokens=10))
    out, reason = g.generate_ids([1, 2, 3], SamplingParams(temperature=0, max_tokens=10), eos_id=greedy[4])
    assert out == greedy[:4] and reason == "stop"
    out, reason = g.generate_ids(list(range(90)), SamplingParams(temperature=0, max_tokens=50))
    assert len(out) == 6 and reason == "length"  # context 96
    with pytest.raises(ConfigError, match="context"):
        g.generate_ids(list(range(96)), SamplingParams(max_tokens=1))
    with pytest.raises(ConfigError, match="top_p"):
        g.generate_ids([1], SamplingParams(top_p=0))


def test_stop_strings_from_a_trained_run(tiny_run):
    cfg, p, tok = load_for_inference(tiny_run)
    g = Generator(cfg, p, tok)
    full = g.generate("def ", SamplingParams(temperature=0, max_tokens=30))
    assert full.text
    stop = full.text[5:8]
    cut = g.generate("def ", SamplingParams(temperature=0, max_tokens=30, stop=[stop]))
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)


def test_generate_from_an_exported_hf_folder(tiny_run, tmp_path):
    """A run exported to Hugging Face format generates the same greedy tokens through the CLI loader."""
    from polychip.model.hf import save_hf

    cfg, p, tok = load_for_inference(tiny_run)
    save_hf(tmp_path / "hf", cfg, jax.device_get(p), dtype="float32", tokenizer_path=tiny_run / "tokenizer.json")
    cfg2, p2, tok2 = load_for_inference(tmp_path / "hf")
    import dataclasses

    assert dataclasses.replace(cfg2, multiple_of=cfg.multiple_of) == cfg  # d_ff is explicit in HF configs
    sp = SamplingParams(temperature=0, max_tokens=16)
    assert Generator(cfg2, p2, tok2).generate("class ", sp).tokens == Generator(cfg, p, tok).generate("class ", sp).tokens


@pytest.mark.parametrize("content,needle", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "is not UTF-8 text (byte 0x89 at offset 0)"),
    (b"plain text then\x00a NUL", "looks binary"),
    (None, "cannot read --prompt-file"),  # a directory
])
def test_prompt_file_that_is_not_text_exits_2(tmp_path, capsys, content, needle):
    from polychip.cli import main

    f = tmp_path / "prompt"
    if content is None:
        f.mkdir()
    else:
        f.write_bytes(content)
    assert main(["generate", "--checkpoint", str(tmp_path / "no-such-run"), "--prompt-file", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("polychip: error:") and needle in err and "\n" not in err


def test_undecodable_prompt_argument_exits_2(tmp_path, capsys):
    """Undecodable command-line bytes reach Python as lone surrogates (surrogateescape)."""
    from polychip.cli import main

    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "a\udcffb"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the prompt is not valid Unicode" in err and "\n" not in err


def test_one_validator_for_every_path(model):
    """Generator and the serving engine refuse the same SamplingParams with the same RequestError."""
    from polychip.infer import RequestError
    from polychip.serve.engine import Engine, EngineConfig

    cfg, p = model
    eng = Engine(cfg, p, EngineConfig(max_batch=1, kv_blocks=8, page_size=16))
    for bad, param in ((SamplingParams(temperature=float("nan")), "temperature"), (SamplingParams(top_k=-2), "top_k"),
                       (SamplingParams(top_p=1.5), "top_p"), (SamplingParams(max_tokens=-1), "max_tokens")):
        for run in (lambda: Generator(cfg, p).generate_ids([1, 2], bad),
                    lambda: eng.submit([1, 2], bad, lambda ev: None)):
            with pytest.raises(RequestError) as e:
                run()
            assert e.value.param == param


def test_several_eos_ids_stop_at_the_first_of_them(model):
    cfg, p = model
    g = Generator(cfg, p)
    prompt = [1, 2, 3, 4, 5, 6, 7]
    ref, _ = g.generate_ids(prompt, SamplingParams(temperature=0, max_tokens=24))
    a, b = ref[5], ref[9]
    first = min(ref.index(a), ref.index(b))
    out, reason = g.generate_ids(prompt, SamplingParams(temperature=0, max_tokens=24), frozenset({b, a, 100}))
    assert out == ref[:first] and reason == "stop"
    assert g.generate_ids(prompt, SamplingParams(temperature=0, max_tokens=24), a)[0] == ref[:ref.index(a)]


def test_command_line_sampling_defaults_come_from_the_model():
    import argparse

    from polychip.cli import _sampling_args
    from polychip.infer import GenerationConfig

    args = argparse.Namespace(temperature=None, top_k=None, top_p=None, seed=0, max_tokens=8, stop=None)
    sp = _sampling_args(args, GenerationConfig())  # a run folder: greedy, as before
    assert (sp.temperature, sp.top_k, sp.top_p) == (0.0, 0, 1.0)
    model_defaults = GenerationConfig(sampling_defaults={"temperature": 0.6, "top_p": 0.9, "top_k": 20})
    sp = _sampling_args(args, model_defaults)
    assert (sp.temperature, sp.top_k, sp.top_p) == (0.6, 20, 0.9)
    args.temperature, args.top_k = 0.0, 0  # given on the command line: they win
    sp = _sampling_args(args, model_defaults)
    assert (sp.temperature, sp.top_k, sp.top_p) == (0.0, 0, 0.9)

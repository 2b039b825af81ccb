"""What the model's files say about generation (infer.load_generation_config) and chat templates
(serve/text.py), checked against Hugging Face transformers on tokenizer folders built here (no hub)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from polychip.infer import GenerationConfig, RequestError, load_generation_config
from polychip.serve.text import apply_template, render_chat

TEMPLATE = (Path(__file__).parent / "data" / "chat_template.jinja").read_text()
MESSAGES = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " What is 2+2? "},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": ""}, {"role": "user", "content": "And 3+3?"}],
]


def _folder(tmp_path: Path, tiny_run, **tok_cfg) -> Path:
    """An HF-style tokenizer folder: the tiny run's tokenizer.json, a tokenizer_config.json and config.json."""
    d = tmp_path / "hf"
    d.mkdir()
    shutil.copy(Path(tiny_run) / "tokenizer.json", d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                         "bos_token": "<|bos|>", "eos_token": "<|eos|>", **tok_cfg}))
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return d


def _tok(d: Path):
    from polychip.data.tokenizer import load_tokenizer

    return load_tokenizer(d / "tokenizer.json")


@pytest.mark.parametrize("messages", MESSAGES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tmp_path, tiny_run, messages, add_generation_prompt):
    transformers = pytest.importorskip("transformers")
    d = _folder(tmp_path, tiny_run, chat_template=TEMPLATE)
    tok = _tok(d)
    gcfg = load_generation_config(d, tok)
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    want = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert apply_template(gcfg, messages, add_generation_prompt) == want
    assert want.startswith("<|bos|>")  # the template's bos_token variable was filled
    if add_generation_prompt:
        ids, stops = render_chat(tok, gcfg, messages)
        want_ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert ids == list(want_ids) and stops == []


def test_chat_template_file_wins_and_errors(tmp_path, tiny_run):
    d = _folder(tmp_path, tiny_run, chat_template="{{ 'from tokenizer_config' }}")
    assert apply_template(load_generation_config(d, _tok(d)), MESSAGES[0]) == "from tokenizer_config"
    (d / "chat_template.jinja").write_text(TEMPLATE)
    gcfg = load_generation_config(d, _tok(d))
    assert "<|im_start|>assistant\n" in apply_template(gcfg, MESSAGES[0])
    with pytest.raises(RequestError, match="cannot start with the assistant"):
        apply_template(gcfg, [{"role": "assistant", "content": "hi"}])
    # The sandbox: no reaching Python internals from a template.
    evil = GenerationConfig(chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(RequestError, match="refused"):
        apply_template(evil, MESSAGES[0])
    with pytest.raises(RequestError, match="no chat template") as e:
        apply_template(GenerationConfig(), MESSAGES[0])
    assert e.value.param == "messages"


def test_generation_config_from_files(tmp_path, tiny_run):
    d = _folder(tmp_path, tiny_run, add_bos_token=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": 5, "bos_token_id": 1}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7], "temperature": 0.6, "top_p": 0.9,
                                                          "top_k": 20, "do_sample": True}))
    tok = _tok(d)
    g = load_generation_config(d, tok)
    bos = tok.token_to_id("<|bos|>")
    assert g.eos_ids == {5, 7} and g.bos_id == bos and g.add_bos is True
    assert g.sampling_defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    assert g.default("temperature", None, 1.0) == 0.6 and g.default("temperature", 0.0, 1.0) == 0.0
    ids = tok.encode("hello").ids
    assert g.prompt_ids(ids) == [bos, *ids] and g.prompt_ids([bos, *ids]) == [bos, *ids]
    # do_sample false is greedy in transformers whatever the temperature; add_bos_token false strips one.
    (d / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "do_sample": False}))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eos|>", "add_bos_token": False}))
    g = load_generation_config(d, tok)
    assert g.sampling_defaults["temperature"] == 0.0 and g.eos_ids == {5}
    assert g.prompt_ids([1, *ids]) == ids
    # No eos_token_id anywhere: the tokenizer_config's eos_token.
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert load_generation_config(d, tok).eos_ids == {tok.token_to_id("<|eos|>")}


def test_run_folder_keeps_builtin_rules(tiny_run):
    tok = _tok(Path(tiny_run))
    g = load_generation_config(tiny_run, tok)
    assert g.builtin_chat and g.chat_template is None and g.add_bos is None and g.sampling_defaults == {}
    assert g.eos_ids == {tok.token_to_id("<|eos|>")}
    ids, stops = render_chat(tok, g, [{"role": "user", "content": "hi"}])
    assert tok.decode(ids).endswith("Assistant:") and stops == ["\nUser:"]


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory, tiny_run):
    """The tiny run exported as a Hugging Face folder (eos_token_id from our <|eos|>), no chat template."""
    from polychip.data.tokenizer import load_tokenizer
    from polychip.infer import load_for_inference
    from polychip.model.hf import save_hf

    cfg, params, tok = load_for_inference(tiny_run)
    out = tmp_path_factory.mktemp("hf_tiny") / "m"
    save_hf(out, cfg, params, dtype="float32", tokenizer_path=Path(tiny_run) / "tokenizer.json",
            eos_token_id=load_tokenizer(Path(tiny_run) / "tokenizer.json").token_to_id("<|eos|>"))
    return out


def _generate(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "polychip.cli", "generate", *args], capture_output=True, text=True,
                          timeout=600)


def test_generate_chat_cli(hf_tiny, tmp_path):
    r = _generate("--checkpoint", str(hf_tiny), "--prompt", "hi", "--chat", "--max-tokens", "2")
    assert r.returncode == 2 and "no chat template" in r.stderr and "Traceback" not in r.stderr
    from polychip.generate import Generator
    from polychip.infer import SamplingParams, load_for_inference
    from polychip.serve.text import encode

    cfg, params, tok = load_for_inference(hf_tiny)
    (hf_tiny / "chat_template.jinja").write_text(TEMPLATE)
    try:
        gcfg = load_generation_config(hf_tiny, tok)
        r = _generate("--checkpoint", str(hf_tiny), "--prompt", "hi", "--chat", "--system", "Be brief.",
                      "--max-tokens", "6", "--json")
    finally:
        (hf_tiny / "chat_template.jinja").unlink()
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    # The same reply as Generator on the template's ids (greedy: the command line's default here).
    assert gcfg.eos_ids == {tok.token_to_id("<|eos|>")}
    text = apply_template(gcfg, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    ids = encode(tok, text, special=False)
    want, _ = Generator(cfg, params, tok).generate_ids(ids, SamplingParams(temperature=0, max_tokens=6), gcfg.eos_ids)
    assert got["tokens"] == want and got["prompt_tokens"] == len(ids)


def test_generate_stop_token_id_cli(hf_tiny):
    base = ["--checkpoint", str(hf_tiny), "--prompt", "The history of the", "--max-tokens", "8", "--json"]
    r = _generate(*base)
    assert r.returncode == 0, r.stderr
    toks = json.loads(r.stdout)["tokens"]
    r = _generate(*base, "--stop-token-id", str(toks[3]))
    got = json.loads(r.stdout)
    assert got["tokens"] == toks[:toks.index(toks[3])] and got["finish_reason"] == "stop"

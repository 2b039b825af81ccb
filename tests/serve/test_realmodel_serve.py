"""The server on a real pretrained chat model (SmolLM2-135M-Instruct, built by
scripts/build_fixtures.py into polychip's cache) against Hugging Face transformers: the chat reply
equals apply_chat_template + greedy generate (stopping at the model's own EOS), and echo+logprobs
prompt log-likelihoods equal transformers' within 1e-2.

Opt-in: `pytest -m realmodel tests/serve/test_realmodel_serve.py` (skipped when the fixture is not built)."""
from __future__ import annotations

import numpy as np
import openai
import pytest

from polychip.files import cache_dir
from tests.serve.conftest import ServerThread

pytestmark = pytest.mark.realmodel
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FOLDER = cache_dir("models") / "smollm2-135m-instruct"
QUESTIONS = ["What is the capital of France?", "Say hello in one word."]


@pytest.fixture(scope="module")
def real():
    if not (FOLDER / "model.safetensors").is_file():
        pytest.skip(f"{FOLDER} not built (python scripts/build_fixtures.py)")
    from polychip.infer import load_for_inference, load_generation_config
    from polychip.serve.api import build_app
    from polychip.serve.engine import Engine, EngineConfig

    cfg, params, tok = load_for_inference(FOLDER)
    gcfg = load_generation_config(FOLDER, tok)
    engine = Engine(cfg, params, EngineConfig(max_batch=2, page_size=16, prefill_chunk=64, kv_blocks=64))
    engine.warmup()
    engine.start()
    srv = ServerThread(build_app(engine, tok, "smol", gcfg=gcfg))
    hf_tok = transformers.AutoTokenizer.from_pretrained(FOLDER)
    model = transformers.AutoModelForCausalLM.from_pretrained(FOLDER, dtype=torch.float32).eval()
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=600), hf_tok, model, gcfg
    srv.stop()
    engine.stop()


def test_generation_config_of_the_real_model(real):
    _, hf_tok, _, gcfg = real
    assert gcfg.eos_ids == {2} and gcfg.chat_template and gcfg.eos_token == "<|im_end|>"


@pytest.mark.parametrize("question", QUESTIONS)
def test_chat_reply_equals_transformers(real, question):
    client, hf_tok, model, _ = real
    msgs = [{"role": "user", "content": question}]
    ids = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)[0, len(ids):].tolist()
    stopped = out[-1] in (2,)
    want = hf_tok.decode(out[:-1] if stopped else out)
    r = client.chat.completions.create(model="smol", messages=msgs, max_tokens=48, temperature=0)
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == ("stop" if stopped else "length")
    assert r.usage.prompt_tokens == len(ids)


def test_prompt_loglikelihoods_equal_transformers(real):
    client, hf_tok, model, _ = real
    text = "The capital of France is Paris, and the capital of Italy is Rome."
    ids = hf_tok(text)["input_ids"]
    r = client.completions.create(model="smol", prompt=text, max_tokens=0, echo=True, logprobs=1)
    got = r.choices[0].logprobs.token_logprobs
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1).numpy()
    want = [lp[i - 1, ids[i]] for i in range(1, len(ids))]
    assert got[0] is None and len(got) == len(ids)
    np.testing.assert_allclose(got[1:], want, atol=1e-2)

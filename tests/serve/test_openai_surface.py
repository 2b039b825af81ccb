"""The OpenAI surface evaluation harnesses and client libraries use, against the real server on
loopback with the official openai client: logprobs/top_logprobs, echo (prompt log-likelihoods),
n > 1, batched prompts, stop token ids, the tokenizer endpoints, and what is refused."""
from __future__ import annotations

import math

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

from polychip.generate import SamplingParams
from tests.serve.conftest import MODEL, wait_idle

PROMPT = "The history of the"


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def direct_logprobs(served, ids: list[int]) -> np.ndarray:
    """log_softmax of the model's float32 logits over the whole sequence [T, V], computed directly."""
    from polychip.model import transformer as T

    rt = T.Runtime(served.engine.runner.rt.policy)
    lg = T.logits(served.params, jnp.asarray([ids], jnp.int32), served.cfg, rt)[0][0]
    return np.asarray(jax.nn.log_softmax(lg.astype(jnp.float32), axis=-1))


def greedy(served, ids, n):
    out, _ = served.generator.generate_ids(ids, SamplingParams(temperature=0, max_tokens=n),
                                           served.generator.gcfg.eos_ids)
    return out


def test_echo_prompt_loglikelihoods_equal_direct_float32(served, client):
    ids = served.tok.encode("Once upon a time there was a little").ids
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=5, temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == served.tok.decode(ids) and r.usage.completion_tokens == 0
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = direct_logprobs(served, ids)
    want = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
    np.testing.assert_allclose(lp.token_logprobs[1:], want, rtol=0, atol=1e-5)
    for i in range(1, len(ids)):
        top5 = np.sort(ref[i - 1])[::-1][:5]
        got = sorted(lp.top_logprobs[i].values(), reverse=True)
        np.testing.assert_allclose(got[:5], top5, atol=1e-5)  # (the chosen token may add a 6th)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_partial_character_tokens_keep_their_own_keys(served):
    """Byte tokens that are only part of a UTF-8 character must not collapse into one "\ufffd" key."""
    from polychip.serve.logprobs import completion_logprobs

    tok = served.tok
    ids = [i for i in range(tok.get_vocab_size()) if "\ufffd" in tok.decode([i])][:4]
    assert len(ids) == 4
    lp, end = completion_logprobs(tok, ids[:1], [(-1.0, ids, [-1.0, -2.0, -3.0, -4.0])])
    assert len(lp["top_logprobs"][0]) == 4 and lp["tokens"][0].startswith("bytes:\\x") and end == 1


def test_generated_logprobs_agree_with_scoring(served, client):
    ids = served.tok.encode(PROMPT).ids
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, logprobs=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    out = served.tok.encode(r.choices[0].text).ids
    assert len(lp.tokens) == 8 and len(lp.token_logprobs) == 8
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and math.isclose(chosen, max(top.values()), abs_tol=1e-6)  # greedy
    ref = direct_logprobs(served, ids + greedy(served, ids, 8))
    gen = greedy(served, ids, 8)
    want = [float(ref[len(ids) - 1 + i, t]) for i, t in enumerate(gen)]
    np.testing.assert_allclose(lp.token_logprobs, want, atol=2e-4)  # paged cache vs one full pass
    assert out  # the text decodes back to something
    # lm-evaluation-harness's loglikelihood request: echo + max_tokens 1 + logprobs 1 on token ids.
    ctx, cont = ids[:2], ids[2:]
    e = client.completions.create(model=MODEL, prompt=[ctx + cont], max_tokens=1, echo=True, logprobs=1,
                                  temperature=0, seed=1234)
    elp = e.choices[0].logprobs
    assert len(elp.token_logprobs) == len(ids) + 1
    full = direct_logprobs(served, ids)
    np.testing.assert_allclose(elp.token_logprobs[len(ctx):-1],
                               [full[i - 1, ids[i]] for i in range(len(ctx), len(ids))], atol=1e-5)


def test_echo_streams_the_prompt_first(served, client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=4, echo=True, logprobs=2, temperature=0)
    whole = client.completions.create(**kw).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**kw, stream=True) if c.choices]
    assert chunks[0].text == served.tok.decode(served.tok.encode(PROMPT).ids)
    assert "".join(c.text for c in chunks) == whole.text
    streamed = [x for c in chunks if c.logprobs for x in c.logprobs.token_logprobs]
    assert streamed == whole.logprobs.token_logprobs and streamed[0] is None
    offsets = [x for c in chunks if c.logprobs for x in c.logprobs.text_offset]
    assert offsets == whole.logprobs.text_offset


def test_n_choices_and_batched_prompts(served, client):
    a, b = served.tok.encode("Once upon a time").ids, served.tok.encode(PROMPT).ids
    r = client.completions.create(model=MODEL, prompt=[a, b], n=2, max_tokens=5, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    texts = [c.text for c in r.choices]
    assert texts[0] == texts[1] == served.tok.decode(greedy(served, a, 5))
    assert texts[2] == texts[3] == served.tok.decode(greedy(served, b, 5))
    assert r.usage.prompt_tokens == len(a) + len(b)
    assert r.usage.completion_tokens == 2 * len(greedy(served, a, 5)) + 2 * len(greedy(served, b, 5))
    s = client.completions.create(model=MODEL, prompt=["Once upon a time", PROMPT], max_tokens=5, temperature=0)
    assert [c.text for c in s.choices] == [texts[0], texts[2]]
    # Sampling: n choices differ by seed; the same request gives the same choices.
    kw = dict(model=MODEL, prompt=PROMPT, n=3, max_tokens=8, temperature=1.0, seed=7)
    x, y = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in x.choices] == [c.text for c in y.choices]
    assert len({c.text for c in x.choices}) > 1
    # Streaming several choices: each choice's chunks add up to its non-streamed text.
    st = client.completions.create(model=MODEL, prompt=[a, b], n=2, max_tokens=5, temperature=0, stream=True,
                                   stream_options={"include_usage": True})
    got = ["", "", "", ""]
    chunks = list(st)
    for c in chunks:
        for ch in c.choices:
            got[ch.index] += ch.text
    assert got == texts and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert wait_idle(served.engine)


def test_chat_logprobs_and_n(served, client):
    msgs = [{"role": "user", "content": "Tell me about the sea."}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=2, n=2, stop=["\n\n", "zzz"])
    assert len(r.choices) == 2 and r.choices[0].message.content == r.choices[1].message.content
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens / 2
    for t in content:
        assert len(t.top_logprobs) == 2 and math.isclose(t.logprob, t.top_logprobs[0].logprob, abs_tol=1e-6)
        assert t.token == t.top_logprobs[0].token
        assert t.token.startswith("bytes:") or bytes(t.bytes).decode("utf-8") == t.token
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, top_logprobs=2)


def test_stop_token_ids(served, client):
    ids = served.tok.encode(PROMPT).ids
    ref = greedy(served, ids, 6)
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0,
                                  extra_body={"stop_token_ids": [ref[2]]})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == served.tok.decode(ref[:ref.index(ref[2])])


@pytest.mark.parametrize("kw,param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
])
def test_refused_options(served, client, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, **kw)
    assert e.value.body["param"] == param


def test_tokenizer_endpoints(served):
    t = httpx.post(served.url + "/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()
    assert t["tokens"] == served.tok.encode(PROMPT).ids and t["count"] == len(t["tokens"])
    d = httpx.post(served.url + "/detokenize", json={"tokens": t["tokens"]}).json()
    assert d["prompt"] == PROMPT
    info = httpx.get(served.url + "/tokenizer_info").json()
    assert info["eos_token"] == "<|eos|>"
    assert httpx.post(served.url + "/detokenize", json={"tokens": [10 ** 9]}).status_code == 400

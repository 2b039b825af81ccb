"""End-to-end: the real server over loopback, the official openai client, raw httpx for errors."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from polychip.generate import SamplingParams
from tests.serve.conftest import MODEL, ServerThread, wait_idle

PROMPT = "The history of the"


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def eos(served):
    from polychip.data.tokenizer import special_ids

    return special_ids(served.tok).get("eos")


def test_models_health_metrics(served, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]
    h = httpx.get(served.url + "/health").json()
    assert h["status"] == "ok" and h["kv_blocks"] == 48
    m = httpx.get(served.url + "/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    for name in ("polychip:request_success_total", "polychip:num_requests_waiting", "polychip:kv_cache_usage_perc",
                 "polychip:time_to_first_token_seconds_bucket", "polychip:time_per_output_token_seconds_count",
                 "polychip:generation_tokens_total",
                 "polychip:compiled_programs 10"):  # decode [1|2|4|8, 1], prefill [1|2|4, 16|32]
        assert name in m.text, name


def test_completion_greedy_matches_generate(served, client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
    ids = served.tok.encode(PROMPT).ids
    ref, reason = served.generator.generate_ids(ids, SamplingParams(temperature=0, max_tokens=24), eos_id=eos(served))
    assert r.choices[0].text == served.tok.decode(ref)
    assert r.choices[0].finish_reason == ("length" if reason == "length" else "stop")
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref)
    assert r.usage.total_tokens == len(ids) + len(ref)


def test_completion_token_prompt_and_seeded_sampling(served, client):
    ids = served.tok.encode("Once upon a time").ids
    kw = dict(model=MODEL, prompt=ids, max_tokens=12, temperature=0.9, top_p=0.95, seed=1234)
    a = client.completions.create(**kw, extra_body={"top_k": 40})
    b = client.completions.create(**kw, extra_body={"top_k": 40})
    assert a.choices[0].text == b.choices[0].text  # same seed, same text, whatever else is running
    ref, _ = served.generator.generate_ids(ids, SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1234,
                                                               max_tokens=12), eos_id=eos(served))
    assert a.choices[0].text == served.tok.decode(ref)


def test_completion_streaming(served, client):
    ids = served.tok.encode(PROMPT).ids
    ref, _ = served.generator.generate_ids(ids, SamplingParams(temperature=0, max_tokens=20), eos_id=eos(served))
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == served.tok.decode(ref)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].usage.completion_tokens == len(ref)


def test_chat_nonstreaming_and_streaming(served, client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the sea."}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens >= 1
    s = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0, stream=True)
    chunks = list(s)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_stop_string(served, client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
    cut = next((i for i in range(3, len(full)) if full[i] == " "), None)
    if cut is None:
        pytest.skip("greedy text has no space to stop at")
    stop = full[cut:cut + 2]
    expect = full[: full.index(stop)]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == expect and r.choices[0].finish_reason == "stop"
    s = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in s) == expect
    assert wait_idle(served.engine)


# ----------------------------------------------------------------------------------------------
# Errors: always 4xx in OpenAI's shape
# ----------------------------------------------------------------------------------------------
def assert_openai_error(r: httpx.Response, status: int):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@pytest.mark.parametrize("body,status,param", [
    (b'{"model": "tiny-test", "prompt": "hi", ', 400, None),                    # malformed JSON
    (b'[1, 2, 3]', 400, None),                                                   # not an object
    ({"model": "nope", "prompt": "hi"}, 404, "model"),                           # unknown model
    ({"model": MODEL, "prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),     # negative
    ({"model": MODEL, "prompt": "hi", "max_tokens": 10 ** 9}, 400, "max_tokens"),  # huge
    ({"model": MODEL, "prompt": "hi " * 400}, 400, "prompt"),                    # longer than the context
    ({"model": MODEL, "prompt": "hi", "max_tokens": 127}, 400, "max_tokens"),   # prompt + max_tokens > context
    ({"model": MODEL, "prompt": [1, 2, 10 ** 6]}, 400, "prompt"),                # token id out of vocab
    ({"model": MODEL, "prompt": ""}, 400, "prompt"),
    ({"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "hi", "n": 65}, 400, "n"),
    ({"model": MODEL, "prompt": ["hi"] * 9, "n": 8}, 400, "n"),                 # 72 choices
    ({"model": MODEL, "prompt": [], "max_tokens": 2}, 400, "prompt"),
    ({"model": MODEL, "prompt": [[1, 2], []]}, 400, "prompt"),
    ({"model": MODEL, "prompt": "hi", "stop": ["s"] * 17}, 400, "stop"),
    ({"model": MODEL, "prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "hi", "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"model": MODEL, "prompt": "hi", "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"prompt": "hi"}, 400, "model"),                                            # missing field
])
def test_completion_errors(served, body, status, param):
    if isinstance(body, bytes):
        r = httpx.post(served.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(served.url + "/v1/completions", json=body)
    assert_openai_error(r, status)
    if param is not None:
        assert r.json()["error"]["param"] == param


def test_chat_errors_and_unknown_route(served):
    r = httpx.post(served.url + "/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert_openai_error(r, 400)
    r = httpx.post(served.url + "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "robot", "content": "x"}]})
    assert_openai_error(r, 400)
    assert_openai_error(httpx.get(served.url + "/v1/nothing"), 404)
    assert_openai_error(httpx.get(served.url + "/v1/completions"), 405)


def test_request_size_limit(served):
    from polychip.serve.api import ServerLimits

    srv = ServerThread(served.app_factory(limits=ServerLimits(max_request_bytes=2000)))
    try:
        big = {"model": MODEL, "prompt": "x" * 5000}
        assert_openai_error(httpx.post(srv.url + "/v1/completions", json=big), 413)
        # Chunked upload (no Content-Length): still refused, still in OpenAI's shape.
        r = httpx.post(srv.url + "/v1/completions", content=iter([json.dumps(big).encode()]),
                       headers={"content-type": "application/json"})
        assert_openai_error(r, 413)
        ok = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200
    finally:
        srv.stop()


def test_api_key(served):
    srv = ServerThread(served.app_factory(api_key="s3cret"))
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            assert_openai_error(httpx.get(srv.url + "/v1/models", headers=headers), 401)
            r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "hi"}, headers=headers)
            assert_openai_error(r, 401)
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert c.completions.create(model=MODEL, prompt="hi", max_tokens=3, temperature=0).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()
        assert httpx.get(srv.url + "/health").status_code == 200  # health stays open for probes
    finally:
        srv.stop()


def test_queue_full_is_429(served):
    eng = served.engine
    old = eng.ecfg.max_queue
    eng.ecfg.max_queue = 0
    try:
        r = httpx.post(served.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 4})
        assert_openai_error(r, 429)
        assert r.json()["error"]["type"] == "rate_limit_error"
        r = httpx.post(served.url + "/v1/chat/completions", json={"model": MODEL, "stream": True,
                                                                     "messages": [{"role": "user", "content": "x"}]})
        assert_openai_error(r, 429)
    finally:
        eng.ecfg.max_queue = old
    assert "polychip:requests_rejected_total 2" in httpx.get(served.url + "/metrics").text


def test_extreme_sampling_values_do_not_break_the_batch(served, client):
    """Found by the fuzzer: a top_k beyond int32 once failed the whole running batch with a 500."""
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0.5, seed=2 ** 62,
                                  extra_body={"top_k": 16251195447735120})
    assert r.usage.completion_tokens >= 1
    ref = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0.5, seed=2 ** 62)
    assert r.choices[0].text == ref.choices[0].text  # top_k >= vocab is the same as off

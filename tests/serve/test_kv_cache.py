"""Block pool, prefix cache and incremental detokenisation (no model, no server)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polychip.serve.kv_cache import BlockPool, OutOfBlocks, block_hashes
from polychip.serve.text import TextStream


def test_allocate_free_scratch_never_handed_out():
    pool = BlockPool(9, 4)
    a = pool.allocate(5)
    b = pool.allocate(3)
    assert 0 not in a + b and len(set(a + b)) == 8
    with pytest.raises(OutOfBlocks):
        pool.allocate(1)
    pool.free(a)
    assert pool.available() == 5 and pool.in_use() == 3
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free(a[:1])
    pool.free(b)
    assert pool.all_returned()


def test_block_hashes_chain_on_prefix():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    b = block_hashes([1, 2, 3, 4, 5, 6, 7, 0], 4)
    c = block_hashes([0, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2 and a[0] == b[0] and a[1] != b[1]
    assert c[1] != a[1]  # same tokens in block 1, different prefix -> different hash


def test_prefix_cache_reuse_refcount_and_eviction():
    pool = BlockPool(5, 2)  # 4 usable
    h = block_hashes([1, 2, 3, 4], 2)
    blocks = pool.allocate(2)
    for b, x in zip(blocks, h):
        pool.register(b, x)
    # A second sequence shares both blocks while the first still holds them.
    assert pool.lookup_prefix(h) == blocks
    pool.free(blocks)
    assert pool.in_use() == 2  # still referenced by the second
    pool.free(blocks)
    assert pool.all_returned() and pool.cached_blocks() == 2
    # Idle cached blocks still hit...
    assert pool.lookup_prefix(h[:1]) == blocks[:1]
    pool.free(blocks[:1])
    # ...and are evicted (least recently released first) when fresh blocks run out.
    got = pool.allocate(3)
    assert blocks[1] in got and pool.cached_blocks() == 1
    assert pool.lookup_prefix(h) == blocks[:1]  # chain stops at the evicted block
    pool.free(got + blocks[:1])
    assert pool.all_returned()


def test_prefix_cache_disabled():
    pool = BlockPool(5, 2, enable_prefix_cache=False)
    h = block_hashes([1, 2], 2)
    b = pool.allocate(1)
    pool.register(b[0], h[0])
    assert pool.lookup_prefix(h) == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 4)), max_size=40))
def test_pool_conserves_blocks(ops):
    pool = BlockPool(12, 2)
    held: list[list[int]] = []
    for alloc, n in ops:
        if alloc and n <= pool.available():
            held.append(pool.allocate(n))
        elif held:
            pool.free(held.pop(0))
        assert pool.in_use() == sum(map(len, held))
    for h in held:
        pool.free(h)
    assert pool.all_returned()


class CharTok:
    """A tokenizer stand-in: token i is chr(i)."""

    def decode(self, ids):
        return "".join(map(chr, ids))


def _feed(text: str, stop: list[str]) -> tuple[list[str], bool, str]:
    ts = TextStream(CharTok(), stop)
    parts = []
    for ch in text:
        parts.append(ts.add(ord(ch)))
        if ts.stopped:
            break
    if not ts.stopped:
        parts.append(ts.flush())
    return parts, ts.stopped, "".join(parts)


def test_text_stream_stops_and_never_retracts():
    parts, stopped, out = _feed("hello world. bye", ["ld."])
    assert stopped and out == "hello wor"
    # While "l" could start the stop string it is held back rather than sent and retracted.
    assert "l" not in "".join(parts[:-1])[len("hello wor"):]
    _, stopped, out = _feed("held back then released", ["hex"])
    assert not stopped and out == "held back then released"
    _, stopped, out = _feed("abc", [])
    assert out == "abc"


@settings(max_examples=100, deadline=None)
@given(st.text("abc", max_size=30), st.lists(st.text("abc", min_size=1, max_size=3), max_size=3))
def test_text_stream_matches_batch_truncation(text, stops):
    _, stopped, out = _feed(text, stops)
    cut = min([text.find(s) for s in stops if s in text], default=-1)
    # Streaming stops at the first stop string to *complete*; batch truncation at the first to *start*.
    # They agree whenever no stop string is a proper substring extension of another; check the
    # invariants that always hold: output is a prefix, contains no stop, and stops iff one occurs.
    assert text.startswith(out)
    assert stopped == (cut >= 0)
    assert not any(s in out for s in stops)
    if not stopped:
        assert out == text


def test_kv_pool_sized_from_concurrency_and_serving_length():
    """The pool holds max_batch sequences of max_model_len tokens (CPU reports no memory, so no cap), and
    the page tables span max_model_len, not the model's context."""
    import jax
    import numpy as np

    from polychip.config import ConfigError, build_config
    from polychip.model.transformer import init_params
    from polychip.serve.engine import Engine
    from polychip.serve.config import EngineConfig
    from polychip.serve.runner import kv_blocks_for

    cfg = build_config("tiny").model
    assert kv_blocks_for(cfg, EngineConfig(max_batch=4, page_size=16), 100) == 4 * 7 + 1
    assert kv_blocks_for(cfg, EngineConfig(max_batch=4, page_size=16), cfg.max_seq_len) == (
        4 * -(-cfg.max_seq_len // 16) + 1)
    assert kv_blocks_for(cfg, EngineConfig(max_batch=4, kv_blocks=9), 100) == 9
    params = init_params(cfg, jax.random.PRNGKey(0))
    eng = Engine(cfg, params, EngineConfig(max_batch=2, page_size=16, max_model_len=48))
    assert eng.max_len == 48 and eng.pool.usable == 2 * 3 and eng.runner.max_pages == 3
    with pytest.raises(ConfigError, match="max_model_len .* exceeds the model's context"):
        Engine(cfg, params, EngineConfig(max_model_len=cfg.max_seq_len + 1))
    from polychip.infer import RequestError, SamplingParams
    with pytest.raises(RequestError):  # a prompt longer than the serving length is the client's error
        eng.submit([int(t) for t in np.arange(60) % cfg.vocab_size], SamplingParams(max_tokens=1), lambda ev: None)

"""The scheduler on its own (no device): admission, chunked prefill, decode batching, prefix reuse and
block accounting, with the runner replaced by fixed token arrays."""
import numpy as np

from polychip.infer import SamplingParams
from polychip.serve.config import EngineConfig
from polychip.serve.kv_cache import BlockPool
from polychip.serve.scheduler import Scheduler, Sequence


def seq(i, prompt, budget, stop=frozenset()):
    return Sequence(i, prompt, SamplingParams(), (0.0, 0, 1.0), budget, stop, lambda ev: None,
                    key_data=np.zeros(2, np.uint32))


def run(sch, batch, tok):
    """Pretend the runner sampled `tok` for every row; returns the accepted (seq id, token, reason)."""
    out = []
    toks = np.full(batch.size, tok, np.int32)
    keys = np.arange(2 * batch.size, dtype=np.uint32).reshape(batch.size, 2)
    for s, t in sch.update(batch, toks, keys):
        emit, reason = sch.accept(s, t)
        out.append((s.id, t if emit else None, reason))
        if reason:
            sch.remove(s)
    return out


def test_chunked_prefill_then_batched_decode_and_blocks_back():
    ecfg = EngineConfig(max_batch=2, page_size=4, prefill_chunk=8, prefill_rows=1)
    pool = BlockPool(8, 4)  # 7 usable
    sch = Scheduler(ecfg, pool)
    a, b, c = seq(1, list(range(10)), 2), seq(2, [5, 6, 7], 3), seq(3, [1], 1)
    for s in (a, b, c):
        sch.add(s)
    assert sch.admit() == [a, b]  # max_batch 2: c waits
    assert pool.in_use() == 3 + 2  # ceil((10+2)/4) + ceil((3+3)/4)
    p = sch.schedule("prefill")
    assert (p.kind, p.size, p.width, p.rows[0].tokens, p.rows[0].start) == ("prefill", 1, 8, list(range(8)), 0)
    assert run(sch, p, 9) == [] and a.computed == 8  # middle chunk: nothing sampled
    p = sch.schedule("prefill")
    assert (p.width, p.rows[0].tokens, p.rows[0].start) == (8, [8, 9], 8)  # padded to the 8 bucket
    assert run(sch, p, 42) == [(1, 42, None)]
    assert sch.schedule("decode").rows[0].tokens == [42]
    p = sch.schedule("prefill")
    assert run(sch, p, 7) == [(2, 7, None)]
    d = sch.schedule("decode")
    assert (d.size, [r.start for r in d.rows]) == (2, [10, 3])  # positions of each row's newest token
    assert run(sch, d, 1) == [(1, 1, "length"), (2, 1, None)]  # a's budget of 2 is spent
    assert sch.admit() == [c]
    assert run(sch, sch.schedule("prefill"), 3) == [(3, 3, "length")]
    assert run(sch, sch.schedule("decode"), 0) == [(2, 0, "length")]
    assert not sch.has_work() and pool.all_returned()


def test_prefill_batches_the_first_prompts_chunks():
    """prefill_rows prompts share a prefill step, each with its own next chunk at its own position; a
    prompt that finishes moves to decode while a longer one keeps its row in the next step."""
    ecfg = EngineConfig(max_batch=4, page_size=4, prefill_chunk=8, prefill_rows=2)
    sch = Scheduler(ecfg, BlockPool(16, 4))
    a, b, c = seq(1, list(range(10)), 1), seq(2, [5, 6, 7], 2), seq(3, [1, 2], 1)
    for s in (a, b, c):
        sch.add(s)
    assert sch.admit() == [a, b, c]
    p = sch.schedule("prefill")
    assert (p.seqs, p.size, p.width) == ([a, b], 2, 8)
    assert [(r.tokens, r.start) for r in p.rows] == [(list(range(8)), 0), ([5, 6, 7], 0)]
    assert run(sch, p, 4) == [(2, 4, None)]  # a's middle chunk samples nothing; b starts decoding
    p = sch.schedule("prefill")
    assert (p.seqs, p.size, p.width) == ([a, c], 2, 8)
    assert [(r.tokens, r.start) for r in p.rows] == [([8, 9], 8), ([1, 2], 0)]
    assert run(sch, p, 5) == [(1, 5, "length"), (3, 5, "length")]
    assert sch.schedule("prefill") is None and [r.start for r in sch.schedule("decode").rows] == [3]


def test_stop_token_is_not_emitted_and_fifo_waits_for_blocks():
    ecfg = EngineConfig(max_batch=4, page_size=4, prefill_chunk=16)
    pool = BlockPool(4, 4)  # 3 usable
    sch = Scheduler(ecfg, pool)
    a, b = seq(1, [1, 2, 3], 9, stop=frozenset({0})), seq(2, [4], 1)
    sch.add(a)
    sch.add(b)
    assert sch.admit() == [a] and list(sch.waiting) == [b]  # a reserved all 3 blocks (3 + 9 tokens)
    assert sch.admit() == [] and pool.available() == 0
    assert run(sch, sch.schedule("prefill"), 0) == [(1, None, "stop")]  # the stop id ends a, unsent
    assert pool.available() == 3 and sch.admit() == [b]


def test_prefix_blocks_are_reused():
    ecfg = EngineConfig(max_batch=2, page_size=4, prefill_chunk=16)
    pool = BlockPool(16, 4)
    hits = []
    sch = Scheduler(ecfg, pool, lambda queried, hit: hits.append((queried, hit)))
    shared = list(range(8))
    a = seq(1, shared + [9], 1)
    sch.add(a)
    sch.admit()
    first = list(a.blocks)
    assert run(sch, sch.schedule("prefill"), 5) == [(1, 5, "length")]  # a is done; its blocks stay cached
    b = seq(2, shared + [10, 11], 1)
    sch.add(b)
    assert sch.admit() == [b] and hits == [(9, 0), (10, 8)]  # tokens: 2 blocks of 4 reused
    assert b.blocks[:2] == first[:2] and b.computed == 8
    assert sch.schedule("prefill").rows[0].tokens == [10, 11]  # only the new tokens are computed

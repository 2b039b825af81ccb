import json

import numpy as np
import pytest

from polychip.config import DataConfig
from polychip.data import (DataError, TokenStream, load_tokenizer, prepare, save_tokenizer, special_ids,
                           split_documents, tokenize_documents, train_tokenizer)


def synthetic(n_docs=40, seed=0):
    """Token stream where every token names its document: doc i holds only the value i (+ EOS -1)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 200, size=n_docs)
    tokens = np.concatenate([np.full(n, i, dtype=np.int32) for i, n in enumerate(lengths)])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return tokens, offsets


@pytest.fixture(scope="module")
def stream(small_tok, small_docs):
    return TokenStream.from_documents(small_tok, small_docs, special_ids(small_tok)["eos"], eval_fraction=0.05, seed=3)


# ---------------------------------------------------------------------------------------------- tokenize
def test_tokenize_documents_appends_eos_to_each(small_tok, small_docs):
    eos = special_ids(small_tok)["eos"]
    docs = small_docs[:7]
    toks = tokenize_documents(small_tok, docs, eos)
    assert toks.dtype == np.int32 and toks.ndim == 1
    expected = np.concatenate([np.array(small_tok.encode(d, add_special_tokens=False).ids + [eos]) for d in docs])
    np.testing.assert_array_equal(toks, expected)
    assert (toks == eos).sum() == len(docs)


# ---------------------------------------------------------------------------------------------- determinism
def test_batch_shape_dtype_and_rows_are_stream_windows(stream):
    b = stream.batch(7, batch_size=8, seq_len=64)
    assert b.shape == (8, 65) and b.dtype == np.int32
    toks = stream.tokens("train")
    for row in b:
        # Every row is a window starting at a multiple of seq_len.
        starts = [s for s in range(0, toks.size - 64, 64) if toks[s] == row[0] and np.array_equal(toks[s:s + 65], row)]
        assert starts


def test_same_step_same_batch_different_step_different(stream):
    a = stream.batch(11, 8, 64)
    np.testing.assert_array_equal(a, stream.batch(11, 8, 64))
    assert not np.array_equal(a, stream.batch(12, 8, 64))


def test_seed_changes_order(small_tok, small_docs):
    eos = special_ids(small_tok)["eos"]
    a = TokenStream.from_documents(small_tok, small_docs, eos, seed=0)
    b = TokenStream.from_documents(small_tok, small_docs, eos, seed=1)
    assert not np.array_equal(a.batch(0, 8, 64), b.batch(0, 8, 64))


def test_each_epoch_visits_every_window_once():
    tokens, offsets = synthetic()
    s = TokenStream(tokens, offsets)
    n = s.num_windows(16)
    bs = 5
    rows = np.concatenate([s.batch(step, bs, 16) for step in range(3 * n // bs + 2)])
    windows = {tuple(tokens[j * 16:j * 16 + 17]) for j in range(n)}
    for e in range(3):
        epoch_rows = rows[e * n:(e + 1) * n]
        assert len(epoch_rows) == n
        got = sorted(tuple(r) for r in epoch_rows)
        assert got == sorted(tuple(tokens[j * 16:j * 16 + 17]) for j in range(n))
        assert set(got) <= windows
    # Epochs are reshuffled, not repeated in the same order.
    assert not np.array_equal(rows[:n], rows[n:2 * n])


def test_resume_from_fresh_stream_matches(small_tok, small_docs, stream):
    eos = special_ids(small_tok)["eos"]
    before = [stream.batch(k, 8, 64) for k in range(100, 110)]
    # A "restarted" process: re-tokenize the same inputs, jump straight to step 100 (no replay).
    fresh = TokenStream.from_documents(small_tok, small_docs, eos, eval_fraction=0.05, seed=3)
    for k, b in zip(range(100, 110), before):
        np.testing.assert_array_equal(fresh.batch(k, 8, 64), b)
    # Order of calls doesn't matter either (no hidden iterator state).
    np.testing.assert_array_equal(fresh.batch(100, 8, 64), before[0])


@pytest.mark.parametrize("n_proc", [2, 4, 8])
def test_process_slices_concatenate_to_global_batch(stream, n_proc):
    for step in (0, 5, 999):  # 999 crosses several epochs
        whole = stream.batch(step, 16, 32)
        parts = [stream.batch(step, 16, 32, process_index=p, process_count=n_proc) for p in range(n_proc)]
        assert all(p.shape == (16 // n_proc, 33) for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_process_errors(stream):
    with pytest.raises(DataError, match="not divisible by process_count=3"):
        stream.batch(0, 16, 32, process_index=0, process_count=3)
    with pytest.raises(DataError, match="process_index=2 out of range"):
        stream.batch(0, 16, 32, process_index=2, process_count=2)


# ---------------------------------------------------------------------------------------------- eval split
def test_eval_split_is_disjoint_by_document():
    tokens, offsets = synthetic(n_docs=40)
    s = TokenStream(tokens, offsets, eval_fraction=0.1, seed=5)
    assert s.eval_docs.size == 4 and s.train_docs.size == 36
    assert set(s.eval_docs).isdisjoint(s.train_docs)
    assert set(s.eval_docs) | set(s.train_docs) == set(range(40))
    assert set(np.unique(s.tokens("eval"))) == set(s.eval_docs)
    assert set(np.unique(s.tokens("train"))) == set(s.train_docs)
    seen_eval = np.unique(np.concatenate([s.batch(k, 4, 16, split="eval") for k in range(20)]))
    seen_train = np.unique(np.concatenate([s.batch(k, 4, 16) for k in range(50)]))
    assert set(seen_eval) <= set(s.eval_docs)
    assert set(seen_train) <= set(s.train_docs)
    # Seed picks which documents are held out; the split is itself deterministic.
    assert not np.array_equal(split_documents(40, 0.1, 5)[1], split_documents(40, 0.1, 6)[1])
    np.testing.assert_array_equal(split_documents(40, 0.1, 5)[1], s.eval_docs)


def test_single_document_holds_out_tail_tokens():
    tokens = np.arange(1000, dtype=np.int32)
    s = TokenStream(tokens, eval_fraction=0.1)
    np.testing.assert_array_equal(s.tokens("eval"), tokens[900:])
    np.testing.assert_array_equal(s.tokens("train"), tokens[:900])


def test_short_stream_and_missing_eval_errors():
    s = TokenStream(np.arange(50, dtype=np.int32))
    s.batch(0, 2, 49)  # exactly seq_len + 1 tokens is enough
    with pytest.raises(DataError, match=r"train token stream is too short for seq_len=50: 50 tokens, need at least 51"):
        s.batch(0, 2, 50)
    with pytest.raises(DataError, match=r"no eval split"):
        s.batch(0, 2, 8, split="eval")
    with pytest.raises(DataError, match="unknown split"):
        s.batch(0, 2, 8, split="test")
    with pytest.raises(DataError, match="eval_fraction"):
        TokenStream(np.arange(50), eval_fraction=1.0)


# ---------------------------------------------------------------------------------------------- prepare + cache
def _corpus(tmp_path, n=60):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "ünï", "код"]
    p = tmp_path / "corpus.jsonl"
    p.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, size=120))}) + "\n" for _ in range(n)))
    return p


def test_prepare_writes_cache_and_resume_reuses_it(tmp_path):
    src = _corpus(tmp_path)
    cfg = DataConfig(source=str(src), max_bytes=0, eval_fraction=0.1, seed=2)
    out = tmp_path / "run"
    tok, s = prepare(cfg, out, 300)
    assert {p.name for p in out.iterdir()} == {"tokenizer.json", "tokens.npy", "doc_offsets.npy", "tokens.json"}
    meta = json.loads((out / "tokens.json").read_text())
    assert meta["n_tokens"] == s.train_tokens.size + s.eval_tokens.size and meta["n_docs"] == 60
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    tok2, s2 = prepare(cfg, out, 300)  # resumed run: nothing rewritten, same batches
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    assert tok2.to_str() == tok.to_str()
    for k in range(5):
        np.testing.assert_array_equal(s2.batch(k, 4, 32), s.batch(k, 4, 32))
        np.testing.assert_array_equal(s2.batch(k, 2, 32, split="eval"), s.batch(k, 2, 32, split="eval"))

    # Changed input -> re-tokenized with the run's existing tokenizer (not retrained).
    src.write_text(src.read_text() + json.dumps({"text": "alpha beta new"}) + "\n")
    tok3, s3 = prepare(cfg, out, 300)
    assert tok3.to_str() == tok.to_str()
    assert json.loads((out / "tokens.json").read_text())["n_docs"] == 61
    assert (out / "tokenizer.json").stat().st_mtime_ns == stamp["tokenizer.json"]


def test_prepare_rebuilds_corrupt_cache(tmp_path):
    cfg = DataConfig(source=str(_corpus(tmp_path)), max_bytes=0)
    out = tmp_path / "run"
    _, s = prepare(cfg, out, 300)
    (out / "tokens.npy").write_bytes(b"garbage")
    _, s2 = prepare(cfg, out, 300)
    np.testing.assert_array_equal(s2.batch(3, 4, 16), s.batch(3, 4, 16))


def test_prepare_with_given_tokenizer(tmp_path, small_tok, small_vocab):
    tp = tmp_path / "given" / "tokenizer.json"
    save_tokenizer(small_tok, tp)
    cfg = DataConfig(source=str(_corpus(tmp_path)), max_bytes=0, tokenizer=str(tp))
    tok, s = prepare(cfg, tmp_path / "run", small_vocab)
    assert tok.to_str() == small_tok.to_str()
    assert load_tokenizer(tmp_path / "run" / "tokenizer.json").to_str() == small_tok.to_str()

    # Vocab larger than the model's embedding: clear error naming both numbers.
    with pytest.raises(DataError, match=rf"tokenizer has {small_vocab} tokens.*model.vocab_size=512"):
        prepare(cfg, tmp_path / "run2", 512)

    # A different tokenizer than the one this run folder already used.
    other = tmp_path / "other.json"
    save_tokenizer(train_tokenizer(["some other text " * 50], 300), other)
    cfg.tokenizer = str(other)
    with pytest.raises(DataError, match="differs from"):
        prepare(cfg, tmp_path / "run", small_vocab)


def test_prepare_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="yielded no text"):
        prepare(DataConfig(source=str(tmp_path / "empty.txt")), tmp_path / "run", 300)

import json
import os

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from polychip.data import (DataError, check_vocab, load_tokenizer, save_tokenizer, special_ids, tokenizer_hash,
                           train_tokenizer)

SAMPLES = [
    "def f(x):\n    return x + 1\n",
    "  leading spaces,\ttabs\tand trailing  \n\n",
    "héllo wörld — naïve café",
    "你好，世界。 Привет мир. مرحبا 🙂🚀 e\u0301",  # CJK, Cyrillic, Arabic, emoji, combining accent
    "\x00\x01 control bytes \x7f",
    "",
]


def test_vocab_size_is_exact(small_tok, small_vocab):
    assert small_tok.get_vocab_size() == small_vocab == 1000


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(small_tok, text):
    ids = small_tok.encode(text).ids
    assert small_tok.decode(ids) == text


def test_merges_compress_ascii_code(small_tok):
    text = "import os\nfor i in range(10):\n    print(i)\n"
    # Byte-level would be one token per byte; trained merges must do better on code like the corpus.
    # (threshold 0.6: a 1k-token BPE trained on a 200 KB sample, whichever part of the stdlib it is)
    assert len(small_tok.encode(text).ids) < 0.6 * len(text.encode())


def test_special_tokens_of_trained_tokenizer(small_tok):
    ids = special_ids(small_tok)
    assert ids == {"bos": small_tok.token_to_id("<|bos|>"), "eos": small_tok.token_to_id("<|eos|>"),
                   "pad": small_tok.token_to_id("<|pad|>")}
    assert len(set(ids.values())) == 3
    # Special tokens are atomic when they appear in text.
    assert small_tok.encode("a<|eos|>b").ids.count(ids["eos"]) == 1


def test_vocab_too_small_for_bytes():
    with pytest.raises(DataError, match="vocab_size=100 is too small"):
        train_tokenizer(["abc"], 100)


def test_tiny_corpus_gives_fewer_tokens_not_an_error():
    tok = train_tokenizer(["ab ab ab"], 1000)
    assert 259 <= tok.get_vocab_size() < 1000
    assert tok.decode(tok.encode("zzz ab").ids) == "zzz ab"


def test_save_load_round_trip_is_atomic(small_tok, tmp_path):
    p = tmp_path / "run" / "tokenizer.json"
    save_tokenizer(small_tok, p)
    assert os.listdir(p.parent) == ["tokenizer.json"]  # no temp file left behind
    tok = load_tokenizer(p)
    assert tokenizer_hash(tok) == tokenizer_hash(small_tok)
    for text in SAMPLES:
        assert tok.encode(text).ids == small_tok.encode(text).ids
    # A model folder holding tokenizer.json works too (HF checkpoint layout).
    assert tokenizer_hash(load_tokenizer(p.parent)) == tokenizer_hash(small_tok)


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match=r"tokenizer file '.*missing\.json' not found"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json' is not a valid tokenizer\.json"):
        load_tokenizer(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"model": {"type": "Nonsense"}}))
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_tokenizer(wrong)


def _foreign_tokenizer(special: list[str], docs: list[str]) -> Tokenizer:
    """A byte-level BPE built with the tokenizers library alone (no polychip, no transformers)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def test_llama3_style_tokenizer_json(small_docs, tmp_path):
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"]
    p = tmp_path / "tokenizer.json"
    _foreign_tokenizer(names, small_docs[:5]).save(str(p))
    tok = load_tokenizer(p)
    assert special_ids(tok) == {"bos": tok.token_to_id(names[0]), "eos": tok.token_to_id(names[1]),
                                "pad": tok.token_to_id(names[2])}
    text = "def g():\n    pass  # ünïcode"
    assert tok.decode(tok.encode(text).ids) == text


def test_single_separator_tokenizer_falls_back(small_docs, tmp_path):
    p = tmp_path / "gpt2ish.json"
    _foreign_tokenizer(["<|endoftext|>"], small_docs[:5]).save(str(p))
    tok = load_tokenizer(p)
    e = tok.token_to_id("<|endoftext|>")
    assert special_ids(tok) == {"bos": e, "eos": e, "pad": e}


def test_no_special_tokens_gives_empty_dict(small_docs):
    assert special_ids(_foreign_tokenizer([], small_docs[:2])) == {}


def test_check_vocab(small_tok, small_vocab):
    check_vocab(small_tok, small_vocab)
    check_vocab(small_tok, small_vocab + 24)  # padded embedding tables are fine
    with pytest.raises(DataError, match=rf"tokenizer has {small_vocab} tokens.*model.vocab_size=512"):
        check_vocab(small_tok, 512)


def test_training_is_deterministic(small_docs, small_tok, small_vocab):
    # Every process of a multi-host run may train its own copy; they must agree exactly.
    assert tokenizer_hash(train_tokenizer(small_docs, small_vocab)) == tokenizer_hash(small_tok)

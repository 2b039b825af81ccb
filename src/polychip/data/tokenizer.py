"""Tokenizer: train a byte-level BPE locally, or load any Hugging Face ``tokenizer.json``.

Byte-level BPE (GPT-2 style, as Llama-3 uses) needs no unknown token: the 256 byte symbols are
the initial alphabet, so every string round-trips exactly (``decode(encode(x)) == x``).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from polychip.files import atomic_write

from .corpus import DataError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD]

# Names tried, in order, for each role. Ours first, then Llama-3, then older conventions
# (Llama-2/SentencePiece, Gemma, GPT-2's single <|endoftext|>).
_CANDIDATES = {
    "bos": [BOS, "<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>"],
    "eos": [EOS, "<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>"],
    "pad": [PAD, "<|finetune_right_pad_id|>", "<pad>", "[PAD]"],
}


def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE on `docs` with exactly `vocab_size` entries when the corpus allows.

    The vocabulary is 3 special tokens (<|bos|>, <|eos|>, <|pad|>), the 256 byte symbols and
    vocab_size - 259 merges. A corpus too small to supply that many merges gives fewer entries.
    """
    n_base = len(SPECIAL_TOKENS) + 256
    if vocab_size < n_base:
        raise DataError(f"vocab_size={vocab_size} is too small for a byte-level BPE (needs >= {n_base}: 256 bytes + 3 specials)")
    tok = Tokenizer(models.BPE())
    # use_regex=True splits on GPT-2's pattern so merges never cross word/space/punctuation
    # boundaries; add_prefix_space=False keeps round trips exact.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a Hugging Face ``tokenizer.json`` (a file, or a model directory holding one)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise DataError(f"tokenizer file {str(p)!r} not found")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise DataError(f"tokenizer file {str(p)!r} is not a valid tokenizer.json: {e}") from None


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> None:
    """Write `tok` as tokenizer.json atomically."""
    atomic_write(path, tok.to_str())


def tokenizer_hash(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON: equal hashes mean identical tokenization."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """Ids of the special tokens by role: {"bos": .., "eos": .., "pad": ..}, where present.

    Each role takes the first name found in `_CANDIDATES` (ours, then Llama-3's
    <|begin_of_text|>/<|end_of_text|>/<|finetune_right_pad_id|>, then <s>, </s>, <pad>, ...).
    Fall-backs: a tokenizer with one document separator (GPT-2's <|endoftext|>) uses it for both
    bos and eos; pad falls back to eos (padding is masked out of the loss anyway). Roles with no
    candidate at all are absent from the dict.
    """
    out: dict[str, int] = {}
    for role, names in _CANDIDATES.items():
        for name in names:
            i = tok.token_to_id(name)
            if i is not None:
                out[role] = i
                break
    if "bos" not in out and "eos" in out:
        out["bos"] = out["eos"]
    if "eos" not in out and "bos" in out:
        out["eos"] = out["bos"]
    if "pad" not in out and "eos" in out:
        out["pad"] = out["eos"]
    return out


def check_vocab(tok: Tokenizer, model_vocab_size: int) -> None:
    """DataError unless every token id fits in the model's embedding table.

    A model vocab larger than the tokenizer's is fine (padded vocabularies are common: Llama-3's
    128256 rows hold 128000 BPE tokens + 256 specials).
    """
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > model_vocab_size:
        raise DataError(
            f"tokenizer has {n} tokens but the model's embedding has only model.vocab_size={model_vocab_size} rows; "
            f"set model.vocab_size >= {n} or use a smaller tokenizer"
        )

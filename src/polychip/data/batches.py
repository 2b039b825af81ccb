"""Token streams and deterministic, resumable batches.

The corpus becomes one flat int32 token stream (each document followed by EOS). A batch is a
pure function of (seed, step, batch_size, seq_len, split): nothing depends on how many batches
were drawn before, so a run restarted from a step-k checkpoint sees exactly the batches it would
have seen, and P processes each taking their slice of a step's batch see exactly what one process
would have seen.

Windows: a stream of L tokens is cut into n = (L - 1) // seq_len windows, window j covering tokens
[j*seq_len, j*seq_len + seq_len + 1) (inputs = row[:-1], targets = row[1:], so consecutive
windows share one token and every token is a target exactly once per epoch). Global sample
g = step * batch_size + row goes to epoch e = g // n and window perm_e[g % n], where perm_e is a
permutation drawn from np.random.default_rng([seed, split_key, e]).
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from polychip.files import atomic_write

from .corpus import DataError, load_documents, source_fingerprint
from .tokenizer import _CANDIDATES, check_vocab, load_tokenizer, save_tokenizer, special_ids, tokenizer_hash, train_tokenizer

log = logging.getLogger(__name__)
_EOS_NAMES = _CANDIDATES["eos"] + _CANDIDATES["bos"]

_SPLIT_KEYS = {"train": 0, "eval": 1}
_ENCODE_CHUNK = 512  # documents per encode_batch call: bounds the Encoding objects held at once


def _tokenize(tok, docs: list[str], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [N], doc_offsets int64 [n_docs + 1]); doc i is tokens[off[i]:off[i+1]], EOS included."""
    pieces: list[np.ndarray] = []
    lengths = np.empty(len(docs), dtype=np.int64)
    eos = np.array([eos_id], dtype=np.int32)
    for start in range(0, len(docs), _ENCODE_CHUNK):
        chunk = docs[start : start + _ENCODE_CHUNK]
        # add_special_tokens=False: a tokenizer's own post-processor (Llama-3 prepends
        # <|begin_of_text|>) must not differ between tokenizers; the separator is our EOS.
        # encode_batch_fast skips offset tracking, which we do not use.
        for j, enc in enumerate(tok.encode_batch_fast(chunk, add_special_tokens=False)):
            ids = np.asarray(enc.ids, dtype=np.int32)
            pieces.append(ids)
            pieces.append(eos)
            lengths[start + j] = ids.size + 1
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return tokens, offsets


def tokenize_documents(tok, docs: list[str], eos_id: int) -> np.ndarray:
    """One flat token stream: int32 [sum of doc lengths + n_docs], each document followed by eos_id."""
    return _tokenize(tok, docs, eos_id)[0]


def split_documents(n_docs: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_doc_ids, eval_doc_ids), both sorted int64 arrays.

    A seeded permutation of the documents; its last round(eval_fraction * n_docs) entries (at least
    one when eval_fraction > 0 and there are >= 2 documents, always leaving one for training) are
    held out. With one document no document-level split is possible: see TokenStream.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"data.eval_fraction must be in [0, 1), got {eval_fraction}")
    n_eval = 0
    if eval_fraction > 0 and n_docs >= 2:
        n_eval = min(max(1, round(eval_fraction * n_docs)), n_docs - 1)
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n_docs)
    return np.sort(perm[: n_docs - n_eval]), np.sort(perm[n_docs - n_eval :])


def _gather_docs(tokens: np.ndarray, offsets: np.ndarray, doc_ids: np.ndarray) -> np.ndarray:
    if doc_ids.size == 0:
        return np.zeros(0, dtype=np.int32)
    if doc_ids.size == offsets.size - 1:  # every document: no copy needed
        return tokens
    return np.concatenate([tokens[offsets[i] : offsets[i + 1]] for i in doc_ids]).astype(np.int32, copy=False)


class TokenStream:
    """A flat token stream with a document-level train/eval split and pure-function batches.

    Args:
      tokens: int32 [N] token ids (e.g. from tokenize_documents).
      doc_offsets: int64 [n_docs + 1] document boundaries (doc i = tokens[off[i]:off[i+1]]);
        None treats the whole stream as one document.
      eval_fraction: fraction of documents held out (chosen by `seed`, see split_documents). With a
        single document the last eval_fraction of its tokens is held out instead.
      seed: seeds the split and every epoch's window permutation.
    """

    def __init__(self, tokens: np.ndarray, doc_offsets: np.ndarray | None = None, *, eval_fraction: float = 0.0, seed: int = 0):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise DataError(f"token stream must be a 1-D integer array, got {tokens.dtype} {tokens.shape}")
        tokens = tokens.astype(np.int32, copy=False)
        if doc_offsets is None:
            doc_offsets = np.array([0, tokens.size], dtype=np.int64)
        doc_offsets = np.asarray(doc_offsets, dtype=np.int64)
        if doc_offsets.ndim != 1 or doc_offsets.size < 2 or doc_offsets[0] != 0 or doc_offsets[-1] != tokens.size \
                or np.any(np.diff(doc_offsets) < 0):
            raise DataError(f"doc_offsets must rise from 0 to len(tokens)={tokens.size}")
        self.seed = int(seed)
        self.eval_fraction = float(eval_fraction)
        self.n_docs = doc_offsets.size - 1
        train_ids, eval_ids = split_documents(self.n_docs, eval_fraction, seed)
        if self.n_docs == 1 and eval_fraction > 0:
            cut = tokens.size - int(math.ceil(eval_fraction * tokens.size))
            self.train_tokens, self.eval_tokens = tokens[:cut], tokens[cut:]
        else:
            self.train_tokens = _gather_docs(tokens, doc_offsets, train_ids)
            self.eval_tokens = _gather_docs(tokens, doc_offsets, eval_ids)
        self.train_docs, self.eval_docs = train_ids, eval_ids
        self._perms: OrderedDict[tuple, np.ndarray] = OrderedDict()

    @classmethod
    def from_documents(cls, tok, docs: list[str], eos_id: int, *, eval_fraction: float = 0.0, seed: int = 0) -> "TokenStream":
        tokens, offsets = _tokenize(tok, docs, eos_id)
        return cls(tokens, offsets, eval_fraction=eval_fraction, seed=seed)

    # ------------------------------------------------------------------------------------------
    def tokens(self, split: str = "train") -> np.ndarray:
        """The split's token stream, int32 [N_split]."""
        if split not in _SPLIT_KEYS:
            raise DataError(f"unknown split {split!r}; use 'train' or 'eval'")
        return self.train_tokens if split == "train" else self.eval_tokens

    def num_windows(self, seq_len: int, split: str = "train") -> int:
        """Distinct [seq_len + 1] windows per epoch of the split (0 if the split is too short)."""
        n = self.tokens(split).size
        return max(0, (n - 1) // seq_len) if seq_len > 0 else 0

    def _perm(self, split: str, seq_len: int, epoch: int, n: int) -> np.ndarray:
        key = (split, seq_len, epoch)
        p = self._perms.get(key)
        if p is None:
            p = np.random.default_rng([self.seed, _SPLIT_KEYS[split], epoch]).permutation(n)
            self._perms[key] = p
            if len(self._perms) > 4:  # a step touches at most two epochs per split
                self._perms.popitem(last=False)
        return p

    def batch(self, step: int, batch_size: int, seq_len: int, split: str = "train", *,
              process_index: int = 0, process_count: int = 1) -> np.ndarray:
        """Rows of global batch `step`: int32 [batch_size // process_count, seq_len + 1].

        Pure in (seed, step, batch_size, seq_len, split). Process p of n gets global rows
        [p*B/n, (p+1)*B/n), so concatenating all processes' results gives the 1-process batch.
        """
        if step < 0 or batch_size <= 0 or seq_len <= 0:
            raise DataError(f"need step >= 0 and positive batch_size, seq_len; got step={step}, batch_size={batch_size}, seq_len={seq_len}")
        if process_count <= 0 or not 0 <= process_index < process_count:
            raise DataError(f"process_index={process_index} out of range for process_count={process_count}")
        if batch_size % process_count:
            raise DataError(f"batch_size={batch_size} is not divisible by process_count={process_count}")
        toks = self.tokens(split)
        n = self.num_windows(seq_len, split)
        if n == 0:
            what = "no eval split (data.eval_fraction=0)" if split == "eval" and toks.size == 0 else f"{toks.size} tokens"
            raise DataError(
                f"{split} token stream is too short for seq_len={seq_len}: {what}, need at least {seq_len + 1}; "
                "use more data or a shorter train.seq_len"
            )
        per = batch_size // process_count
        g = step * batch_size + process_index * per + np.arange(per, dtype=np.int64)
        epochs, pos = np.divmod(g, n)
        win = np.empty(per, dtype=np.int64)
        for e in np.unique(epochs):
            m = epochs == e
            win[m] = self._perm(split, seq_len, int(e), n)[pos[m]]
        idx = win[:, None] * seq_len + np.arange(seq_len + 1, dtype=np.int64)[None, :]
        return toks[idx]

    def __repr__(self) -> str:
        return (f"TokenStream(train={self.train_tokens.size} tokens/{self.train_docs.size} docs, "
                f"eval={self.eval_tokens.size} tokens/{self.eval_docs.size} docs, seed={self.seed})")


# ----------------------------------------------------------------------------------------------
# Preparation and the on-disk token cache
# ----------------------------------------------------------------------------------------------
_CACHE_VERSION = 1


def _load_cache(out: Path, fingerprint: dict) -> tuple[np.ndarray, np.ndarray] | None:
    meta_p, tok_p, off_p = out / "tokens.json", out / "tokens.npy", out / "doc_offsets.npy"
    if not (meta_p.is_file() and tok_p.is_file() and off_p.is_file()):
        return None
    try:
        meta = json.loads(meta_p.read_text())
        if meta.get("fingerprint") != fingerprint:
            return None
        tokens = np.load(tok_p, mmap_mode="r")  # memory-mapped: large corpora are not read up front
        offsets = np.load(off_p)
    except (OSError, ValueError):
        return None  # unreadable cache: rebuild it rather than fail
    if tokens.dtype != np.int32 or tokens.shape != (meta.get("n_tokens"),) or offsets.shape != (meta.get("n_docs", -2) + 1,):
        return None
    return tokens, offsets


def prepare(cfg, out_dir, vocab_size: int) -> tuple[Tokenizer, TokenStream]:
    """Corpus -> tokenizer -> cached token stream, for a run writing to `out_dir`.

    Tokenizer: out_dir/tokenizer.json if it exists (a resumed run keeps its tokenizer), else
    `cfg.tokenizer` if set (copied to out_dir/tokenizer.json), else a byte-level BPE with
    `vocab_size` entries trained on the corpus. Raises DataError if the tokenizer has more tokens
    than `vocab_size` (the model's embedding rows), has no end-of-text token, or if `cfg.tokenizer`
    differs from the tokenizer an earlier run in out_dir used.

    Tokens: out_dir/tokens.npy (int32 [N]) + doc_offsets.npy (int64 [n_docs + 1]) + tokens.json
    (fingerprint: source, text_field, max_bytes, resolved file sizes/mtimes, tokenizer sha256, eos
    id). A matching fingerprint reuses the cache; anything else re-tokenizes. The seed and
    eval_fraction are not part of it: they only pick the split and order, applied on load.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_path = out / "tokenizer.json"
    docs: list[str] | None = None
    t0 = time.perf_counter()
    if tok_path.is_file():
        tok = load_tokenizer(tok_path)
        if cfg.tokenizer and tokenizer_hash(load_tokenizer(cfg.tokenizer)) != tokenizer_hash(tok):
            raise DataError(
                f"data.tokenizer={cfg.tokenizer!r} differs from {str(tok_path)!r}, which an earlier run in this "
                "folder used; use a new out_dir or delete that file"
            )
        log.info("reusing tokenizer %s", tok_path)
    elif cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
        save_tokenizer(tok, tok_path)
    else:
        docs = load_documents(cfg)
        tok = train_tokenizer(docs, vocab_size)
        save_tokenizer(tok, tok_path)
        log.info("trained a %d-token byte-level BPE in %.1fs", tok.get_vocab_size(), time.perf_counter() - t0)
    check_vocab(tok, vocab_size)
    ids = special_ids(tok)
    if "eos" not in ids:
        raise DataError(f"tokenizer {str(tok_path)!r} has no end-of-text token (looked for {', '.join(_EOS_NAMES)})")

    fingerprint = {
        "version": _CACHE_VERSION,
        "inputs": source_fingerprint(cfg.source, cfg.text_field, cfg.max_bytes),
        "tokenizer_sha256": tokenizer_hash(tok),
        "eos_id": ids["eos"],
    }
    cached = _load_cache(out, fingerprint)
    if cached is not None:
        tokens, offsets = cached
        log.info("reusing token cache %s (%d tokens)", out / "tokens.npy", tokens.size)
    else:
        t1 = time.perf_counter()
        if docs is None:
            docs = load_documents(cfg)
        tokens, offsets = _tokenize(tok, docs, ids["eos"])
        # Arrays first, metadata last: the JSON is the commit marker, so a crash in between
        # leaves a cache that fails the fingerprint/shape check and is rebuilt.
        atomic_write(out / "tokens.npy", lambda f: np.save(f, tokens))
        atomic_write(out / "doc_offsets.npy", lambda f: np.save(f, offsets))
        meta = {"fingerprint": fingerprint, "n_tokens": int(tokens.size), "n_docs": int(offsets.size - 1),
                "source": cfg.source, "max_bytes": cfg.max_bytes, "text_field": cfg.text_field}
        atomic_write(out / "tokens.json", json.dumps(meta, indent=1))
        log.info("tokenized %d documents -> %d tokens in %.1fs", len(docs), tokens.size, time.perf_counter() - t1)
    return tok, TokenStream(tokens, offsets, eval_fraction=cfg.eval_fraction, seed=cfg.seed)

"""Data pipeline: corpus readers, tokenizer, deterministic resumable batches.

    docs = load_documents(cfg.data)                       # list[str], deterministic order
    tok, stream = prepare(cfg.data, out_dir, vocab_size)  # trains/loads tokenizer, caches tokens
    batch = stream.batch(step, batch_size, seq_len)       # int32 [B, T + 1], pure in (seed, step)

Owns: corpus reading, the tokenizer, deterministic resumable token batches.
May import: files, yamlpos, config, hardware (layer 2; tests/test_layers.py).
"""
from .batches import TokenStream, prepare, split_documents, tokenize_documents
from .corpus import DataError, load_documents, resolve_files
from .tokenizer import check_vocab, load_tokenizer, save_tokenizer, special_ids, tokenizer_hash, train_tokenizer

__all__ = [
    "DataError", "TokenStream", "check_vocab", "load_documents", "load_tokenizer", "prepare", "resolve_files",
    "save_tokenizer", "special_ids", "split_documents", "tokenize_documents", "tokenizer_hash", "train_tokenizer",
]

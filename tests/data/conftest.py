"""Shared, session-scoped fixtures: a ~200 KB slice of the stdlib and a small BPE trained on it."""
import pytest

from polychip.config import DataConfig
from polychip.data import load_documents, train_tokenizer

SMALL_VOCAB = 1000


@pytest.fixture(scope="session")
def small_docs() -> list[str]:
    return load_documents(DataConfig(source="stdlib", max_bytes=200_000))


@pytest.fixture(scope="session")
def small_vocab() -> int:
    return SMALL_VOCAB


@pytest.fixture(scope="session")
def small_tok(small_docs):
    return train_tokenizer(small_docs, SMALL_VOCAB)

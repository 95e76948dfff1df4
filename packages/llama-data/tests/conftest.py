"""Shared test data for llama-data's tests."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from llama_data.document import Document


def planted_near_duplicates(*, n_base: int, vocab_size: int, seed: int = 0) -> list[Document]:
    """`n_base` random 200-word documents over a random vocabulary of `vocab_size` words; every
    other one (even index) gets two variants with 1 to 14 word edits each (70% substitutions,
    30% deletions), ids `b{base:03d}` and `b{base:03d}v{variant}`."""
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9)))
        for _ in range(vocab_size)
    ]
    docs: list[Document] = []
    for base in range(n_base):
        words = rng.choices(vocab, k=200)
        docs.append(Document(id=f"b{base:03d}", text=" ".join(words)))
        for variant in range(2 if base % 2 == 0 else 0):
            edited = list(words)
            for _ in range(rng.randint(1, 14)):
                position = rng.randrange(len(edited))
                if rng.random() < 0.7:
                    edited[position] = rng.choice(vocab)
                else:
                    del edited[position]
            docs.append(Document(id=f"b{base:03d}v{variant}", text=" ".join(edited)))
    return docs


@pytest.fixture(scope="session")
def planted_corpus() -> Callable[..., list[Document]]:
    """`planted_near_duplicates`, for tests that need documents with known near-duplicates."""
    return planted_near_duplicates

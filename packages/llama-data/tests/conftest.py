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


def web_corpus(seed: int, n_files: int = 6, per_file: int = 30) -> list[list[Document]]:
    """Input files with every kind of duplicate planted across files: the same URL crawled on
    several dates, exact copies (whitespace apart), near copies, and boilerplate lines."""
    rng = random.Random(seed)
    vocabulary = [f"v{i}" for i in range(400)]
    n_bases = max(15, n_files * per_file // 4)
    bases = [" ".join(rng.choice(vocabulary) for _ in range(50)) for _ in range(n_bases)]
    menu = ["Home | About | Contact", "Accept all cookies", "Share this page"]
    files = []
    for f in range(n_files):
        docs = []
        for j in range(per_file):
            words = rng.choice(bases).split()
            for _ in range(rng.choice([0, 0, 1, 3, 20])):
                words[rng.randrange(len(words))] = rng.choice(vocabulary)
            lines = [" ".join(words), *rng.sample(menu, rng.randint(0, 2))]
            text = "\n".join(lines) + (" " if rng.random() < 0.2 else "")
            date = f"2024-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}"
            docs.append(
                Document(
                    id=f"{f}-{j}",
                    text=text if rng.random() > 0.03 else "",  # a few empty ones
                    url=f"https://site.example/p{rng.randint(0, n_files * per_file)}",
                    metadata={"crawl_date": date},
                )
            )
        files.append(docs)
    return files


@pytest.fixture(scope="session")
def planted_corpus() -> Callable[..., list[Document]]:
    """`planted_near_duplicates`, for tests that need documents with known near-duplicates."""
    return planted_near_duplicates


@pytest.fixture(scope="session")
def web_corpora() -> Callable[..., list[list[Document]]]:
    """`web_corpus`, for tests of the global steps."""
    return web_corpus

"""Shared fixtures for the llama_model tests.

Tokenizer and chat fixtures: the real Llama 3 tokenizer (ours and Meta's reference), the chat
format, and the text corpus of `corpus.py`. Loading is session-scoped because it is the slow part.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from llama_model.chat import ChatFormat
from llama_model.tokenizer import Tokenizer

# Without a GPU, tests that force llama_kernels' Triton backend run it under Triton's CPU
# interpreter; llama_kernels imports Triton lazily, so setting this at collection is early enough.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _load_corpus() -> ModuleType:
    # Tests run with --import-mode=importlib, so sibling modules are loaded by path.
    spec = importlib.util.spec_from_file_location(
        "llama_model_tests_corpus", Path(__file__).with_name("corpus.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_CORPUS = _load_corpus()


@pytest.fixture(scope="session")
def plain_texts() -> dict[str, str]:
    """Corpus texts without special-token strings: every tokenizer must agree on them."""
    return dict(_CORPUS.PLAIN_TEXTS)


@pytest.fixture(scope="session")
def all_texts() -> dict[str, str]:
    """The whole corpus, including special-token look-alikes written as text."""
    return dict(_CORPUS.ALL_TEXTS)


@pytest.fixture(scope="session")
def special_lookalikes() -> dict[str, str]:
    """Texts containing special-token strings such as "<|eot_id|>"."""
    return dict(_CORPUS.SPECIAL_LOOKALIKES)


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """Our Llama 3 tokenizer, loaded from the installed llama-models package."""
    return Tokenizer.llama3()


@pytest.fixture(scope="session")
def reference_tokenizer() -> Any:
    """Meta's reference Llama 3 tokenizer (`llama_models.llama3.tokenizer.Tokenizer`)."""
    from llama_models.llama3.tokenizer import Tokenizer as ReferenceTokenizer

    return ReferenceTokenizer.get_instance()


@pytest.fixture(scope="session")
def chat_format(tokenizer: Tokenizer) -> ChatFormat:
    """Our chat format over the real Llama 3 tokenizer."""
    return ChatFormat(tokenizer)

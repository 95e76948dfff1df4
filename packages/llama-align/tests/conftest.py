"""Shared test setup for llama_align: a tiny model saved as a Hugging Face directory, and small
JSONL files (helpers in `align_fixtures`, put on sys.path here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from align_fixtures import preference_rows, prompt_rows, sft_rows, tiny_llama
from llama_align.data import write_rows
from llama_model import Tokenizer, save_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face directory of the tiny model (float32, with the tokenizer files)."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_checkpoint(tiny_llama(), path, tokenizer=Tokenizer.llama3())
    return path


@pytest.fixture
def jsonl(tmp_path: Path) -> dict[str, Path]:
    """sft.jsonl (8 dialogs), preferences.jsonl (8 pairs), prompts.jsonl (4 prompts)."""
    return {
        "sft": write_rows(tmp_path / "sft.jsonl", sft_rows(8)),
        "preferences": write_rows(tmp_path / "preferences.jsonl", preference_rows(8)),
        "prompts": write_rows(tmp_path / "prompts.jsonl", prompt_rows(4)),
    }

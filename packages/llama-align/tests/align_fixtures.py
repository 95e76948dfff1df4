"""Test helpers shared by llama_align's tests (on sys.path through conftest): a tiny random Llama
with Llama 3's vocabulary, so the real tokenizer and chat format apply, and small rows."""

from __future__ import annotations

import torch

from llama_align.data import PreferenceRow, PromptRow, SftRow
from llama_model import Llama, LlamaConfig, Message

TINY = LlamaConfig(
    dim=64, n_layers=2, n_heads=2, n_kv_heads=1, multiple_of=32, max_seq_len=256, rope_scaling=None
)


def tiny_llama(seed: int = 0) -> Llama:
    """The tiny model, initialised reproducibly from `seed`."""
    torch.manual_seed(seed)
    model = Llama(TINY)
    model.init_weights(seed=seed)
    return model


def sft_rows(n: int) -> list[SftRow]:
    """`n` short arithmetic dialogs."""
    return [
        SftRow(
            messages=[
                Message(role="user", content=f"What is {i} plus {i}?"),
                Message(role="assistant", content=f"It is {2 * i}."),
            ]
        )
        for i in range(n)
    ]


def preference_rows(n: int) -> list[PreferenceRow]:
    """`n` pairs: the true sum is chosen, a wrong one rejected."""
    return [
        PreferenceRow(
            prompt=[Message(role="user", content=f"What is {i} plus {i}?")],
            chosen=[Message(role="assistant", content=f"It is {2 * i}.")],
            rejected=[Message(role="assistant", content=f"It is {2 * i + 1}.")],
        )
        for i in range(n)
    ]


def prompt_rows(n: int) -> list[PromptRow]:
    """`n` prompts."""
    return [
        PromptRow(messages=[Message(role="user", content=f"What is {i} plus {i}?")])
        for i in range(n)
    ]

"""The public API of llama_model is pinned: adding or removing a name is a deliberate change."""

from __future__ import annotations

import llama_model

EXPECTED = [
    "ChatFormat",
    "EncodedDialog",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "Message",
    "PRESETS",
    "RopeScaling",
    "Tokenizer",
    "ToolCall",
    "atomic_write",
    "count_parameters",
    "document_positions",
    "flops_per_token",
    "format_validation_error",
    "generate",
    "init_parameters",
    "initial_parameter",
    "load_checkpoint",
    "publish_directory",
    "sample",
    "save_checkpoint",
]


def test_public_api_is_pinned() -> None:
    """__all__ lists exactly the expected names, and each one is importable."""
    assert sorted(llama_model.__all__) == sorted(EXPECTED)
    for name in EXPECTED:
        assert getattr(llama_model, name) is not None


def test_package_ships_type_information() -> None:
    """The installed package carries py.typed, so type checkers use its annotations."""
    from importlib.resources import files

    assert files("llama_model").joinpath("py.typed").is_file()

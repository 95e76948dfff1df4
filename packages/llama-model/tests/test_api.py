"""The public API of llama_model is pinned: adding or removing a name is a deliberate change."""

from __future__ import annotations

import llama_model

EXPECTED = [
    # configuration and sizes
    "PRESETS",
    "LlamaConfig",
    "RopeScaling",
    "count_parameters",
    "flops_per_token",
    "format_validation_error",
    "load_config",
    # the model
    "Llama",
    "document_positions",
    "init_parameters",
    # the attention seam
    "AttentionBackend",
    "AttentionKernel",
    "Causal",
    "Documents",
    "Segments",
    "ExplicitMask",
    "CachedAttention",
    # inference
    "KVCache",
    "KVCacheProtocol",
    "decode_one_token",
    "generate",
    # text
    "ChatFormat",
    "EncodedDialog",
    "Message",
    "ToolCall",
    "Tokenizer",
    # tool calling
    "LLAMA31_BUILTIN_TOOLS",
    "with_tool_prompt",
    # checkpoints and crash-safe files
    "load_checkpoint",
    "save_checkpoint",
    "config_from_hf",
    "config_to_hf",
    "to_hf_name",
    "from_hf_name",
    "read_hf_tensors",
    "check_state_dict",
    "check_checkpoint_target",
    "atomic_write",
    "publish_directory",
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

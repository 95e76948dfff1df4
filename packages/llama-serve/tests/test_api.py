"""The public API of llama_serve is pinned: adding or removing a name is a deliberate change."""

from __future__ import annotations

from importlib.resources import files

import llama_serve

EXPECTED = [
    "Engine",
    "AsyncEngine",
    "EngineConfig",
    "Prompt",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "quantize_fp8",
    "compare_logits",
    "save_fp8_checkpoint",
    "load_fp8_checkpoint",
    "is_fp8_checkpoint",
    "build_app",
    "ServerConfig",
    "serve_in_background",
    "Backend",
    "BackendLoad",
    "NativeBackend",
    "VllmBackend",
    "Shield",
    "Verdict",
    "LlamaGuardShield",
    "RuleShield",
    "LLAMA_GUARD_CATEGORIES",
    "REFUSAL",
    "llama_guard_prompt",
    "parse_llama_guard",
]


def test_public_api_is_pinned() -> None:
    """__all__ lists exactly the expected names, and each one is importable."""
    assert sorted(llama_serve.__all__) == sorted(EXPECTED)
    for name in EXPECTED:
        assert getattr(llama_serve, name) is not None


def test_package_ships_type_information() -> None:
    """The installed package carries py.typed, so type checkers use its annotations."""
    assert files("llama_serve").joinpath("py.typed").is_file()

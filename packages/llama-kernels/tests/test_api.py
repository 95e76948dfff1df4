"""The public API of llama_kernels is pinned: adding or removing a name is a deliberate change."""

from __future__ import annotations

from importlib.resources import files

import llama_kernels

EXPECTED = [
    "BackendChoice",
    "set_backend",
    "Fp8RowwiseLinear",
    "SCALE_UB",
    "RopeLayout",
    "apply_rope",
    "bf16_is_fast",
    "cpu_bf16_instructions",
    "fp8_rowwise_matmul",
    "quantize_fp8_rowwise",
    "rms_norm",
    "rope_frequencies",
]


def test_public_api_is_pinned() -> None:
    """__all__ lists exactly the expected names, and each one is importable."""
    assert sorted(llama_kernels.__all__) == sorted(EXPECTED)
    for name in EXPECTED:
        assert getattr(llama_kernels, name) is not None


def test_package_ships_type_information() -> None:
    """The installed package carries py.typed, so type checkers use its annotations."""
    assert files("llama_kernels").joinpath("py.typed").is_file()

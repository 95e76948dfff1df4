"""Which implementation runs: `set_backend`, and the environment variable read once at import."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from llama_kernels import rms_norm, set_backend
from llama_kernels._backend import backend_for


def test_set_backend_switches_and_returns_the_previous_choice() -> None:
    """The choice applies to every later call, "auto" picks torch on the CPU, bad names fail."""
    x = torch.ones(2, 4)
    previous = set_backend("torch")
    try:
        assert backend_for(x) == "torch"
        assert set_backend("auto") == "torch"
        assert backend_for(x) == "torch"  # auto: Triton only for CUDA tensors
        with pytest.raises(ValueError, match="'fast' is not a backend"):
            set_backend("fast")  # type: ignore[arg-type]
    finally:
        set_backend(previous)


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-c", code], env={**environment, **env}, capture_output=True, text=True
    )


def test_the_environment_sets_the_initial_choice_once() -> None:
    """LLAMA_KERNELS_BACKEND is read when llama_kernels is imported (triton on a CPU tensor then
    needs the interpreter, and says so) and not afterwards; a bad value fails the import."""
    code = (
        "import os, torch, llama_kernels\n"
        "from llama_kernels._backend import backend_for\n"
        "os.environ['LLAMA_KERNELS_BACKEND'] = 'torch'  # too late: read at import\n"
        "backend_for(torch.ones(1))\n"
    )
    result = _run(code, LLAMA_KERNELS_BACKEND="triton")
    assert result.returncode != 0 and "needs TRITON_INTERPRET=1" in result.stderr, result.stderr
    result = _run("import llama_kernels", LLAMA_KERNELS_BACKEND="cuda")
    assert result.returncode != 0
    assert "LLAMA_KERNELS_BACKEND='cuda' is not a backend" in result.stderr, result.stderr


def test_ops_follow_the_choice(torch_backend: None) -> None:
    """With the torch backend chosen, rms_norm runs the reference (exactly its formula)."""
    x, weight = torch.randn(3, 8), torch.rand(8)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight
    torch.testing.assert_close(rms_norm(x, weight, 1e-5), expected, atol=1e-6, rtol=1e-6)

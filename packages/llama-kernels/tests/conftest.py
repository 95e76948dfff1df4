"""Shared test setup for llama_kernels.

Without a GPU, Triton kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1): that is how
CI tests them. The variable must be set before the first Triton kernel is imported; llama_kernels
imports its Triton modules lazily, so setting it here, at collection, is early enough.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    """Where kernel tests run: CUDA when present, else the CPU (under the Triton interpreter)."""
    return DEVICE


@pytest.fixture
def triton_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Force the Triton backend for the duration of a test."""
    pytest.importorskip("triton", reason="Triton is only installed on Linux")
    monkeypatch.setenv("LLAMA_KERNELS_BACKEND", "triton")
    yield


@pytest.fixture
def torch_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Force the PyTorch reference backend for the duration of a test."""
    monkeypatch.setenv("LLAMA_KERNELS_BACKEND", "torch")
    yield

"""Shared test setup for llama_kernels.

Without a GPU, Triton kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1): that is how
CI tests them. The variable must be set before the first Triton kernel is imported; llama_kernels
imports its Triton modules lazily, so setting it here, at collection, is early enough.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import cast

import pytest
import torch

from llama_kernels import BackendChoice, set_backend

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    """Where kernel tests run: CUDA when present, else the CPU (under the Triton interpreter)."""
    return DEVICE


@pytest.fixture
def select_backend() -> Iterator[Callable[[str], None]]:
    """`select_backend(name)` makes every op run `name` ("torch", "triton") until the test ends."""
    previous = set_backend("auto")
    set_backend(previous)

    def select(name: str) -> None:
        set_backend(cast(BackendChoice, name))

    yield select
    set_backend(previous)


@pytest.fixture
def triton_backend(select_backend: Callable[[str], None]) -> None:
    """Force the Triton backend for the duration of a test."""
    pytest.importorskip("triton", reason="Triton is only installed on Linux")
    select_backend("triton")


@pytest.fixture
def torch_backend(select_backend: Callable[[str], None]) -> None:
    """Force the PyTorch reference backend for the duration of a test."""
    select_backend("torch")

"""Shared test setup for llama_serve: where the model runs."""

from __future__ import annotations

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    """CUDA when present (the Triton FP8 kernels on Ada/Hopper), else the CPU (the PyTorch
    references)."""
    return DEVICE

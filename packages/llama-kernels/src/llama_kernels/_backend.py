"""Which implementation an op runs: the Triton kernel or the PyTorch reference.

By default the Triton kernel runs on CUDA tensors and the PyTorch reference everywhere else.
`set_backend("torch" | "triton" | "auto")` changes that for the process; the environment variable
`LLAMA_KERNELS_BACKEND` gives the initial choice and is read once, at import. Triton on CPU tensors
works only under `TRITON_INTERPRET=1` (Triton's interpreter, which is how CI tests the kernels on
machines without a GPU); asking for it otherwise is an error that says so.

Triton modules are imported lazily, on the first call that needs them: importing llama_kernels
never requires Triton, and `TRITON_INTERPRET` may be set any time before that first call.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal

import torch

__all__ = ["Backend", "BackendChoice", "backend_for", "set_backend", "triton_available"]

Backend = Literal["torch", "triton"]
BackendChoice = Literal["auto", "torch", "triton"]
ENV_VAR = "LLAMA_KERNELS_BACKEND"


def _check_choice(choice: str, where: str) -> BackendChoice:
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"{where}={choice!r} is not a backend; use 'auto', 'torch' or 'triton'")
    return choice  # type: ignore[return-value]


# The process-wide choice: from the environment once, at import (never on a hot path), then
# whatever `set_backend` says.
_choice: BackendChoice = _check_choice(
    os.environ.get(ENV_VAR, "").strip().lower() or "auto", ENV_VAR
)


def set_backend(choice: BackendChoice) -> BackendChoice:
    """Make every op run `choice` from now on: "auto" (Triton on CUDA tensors, the PyTorch
    reference elsewhere), "torch" or "triton". Returns the previous choice, to restore it. The
    initial choice is ``LLAMA_KERNELS_BACKEND`` (read once, when llama_kernels is imported)."""
    global _choice
    previous, _choice = _choice, _check_choice(choice, "backend")
    return previous


@functools.cache
def triton_available() -> bool:
    """Triton is installed (Linux only, as a dependency of the CUDA builds of torch)."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_for(tensor: torch.Tensor) -> Backend:
    """The backend an op on `tensor` runs: the chosen one (`set_backend`), or for "auto" Triton on
    CUDA and torch elsewhere."""
    if _choice == "torch":
        return "torch"
    if _choice == "triton":
        if not triton_available():
            raise RuntimeError("the triton backend was chosen but Triton is not installed (Linux)")
        if tensor.device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"the triton backend on a {tensor.device.type} tensor needs TRITON_INTERPRET=1 "
                "(Triton's CPU interpreter); or move the tensor to CUDA"
            )
        return "triton"
    return "triton" if tensor.device.type == "cuda" and triton_available() else "torch"

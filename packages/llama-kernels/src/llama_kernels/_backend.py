"""Which implementation an op runs: the Triton kernel or the PyTorch reference.

By default the Triton kernel runs on CUDA tensors and the PyTorch reference everywhere else. The
environment variable `LLAMA_KERNELS_BACKEND=torch|triton` overrides that. Triton on CPU tensors
works only under `TRITON_INTERPRET=1` (Triton's interpreter, which is how CI tests the kernels on
machines without a GPU); asking for it otherwise is an error that says so.

Triton modules are imported lazily, on the first call that needs them: importing llama_kernels
never requires Triton, and `TRITON_INTERPRET` may be set any time before that first call.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch

__all__ = ["Backend", "backend_for", "triton_available"]

Backend = Literal["torch", "triton"]
ENV_VAR = "LLAMA_KERNELS_BACKEND"


def triton_available() -> bool:
    """Triton is installed (Linux only, as a dependency of the CUDA builds of torch)."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_for(tensor: torch.Tensor) -> Backend:
    """The backend an op on `tensor` runs: the env override, else Triton on CUDA, else torch."""
    requested = os.environ.get(ENV_VAR, "").strip().lower()
    if requested not in ("", "torch", "triton"):
        raise ValueError(f"{ENV_VAR}={requested!r} is not a backend; use 'torch' or 'triton'")
    if requested == "torch":
        return "torch"
    if requested == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV_VAR}=triton but Triton is not installed (it needs Linux)")
        if tensor.device.type != "cuda" and not _interpreting():
            raise RuntimeError(
                f"{ENV_VAR}=triton on a {tensor.device.type} tensor needs TRITON_INTERPRET=1 "
                "(Triton's CPU interpreter); or move the tensor to CUDA"
            )
        return "triton"
    return "triton" if tensor.device.type == "cuda" and triton_available() else "torch"

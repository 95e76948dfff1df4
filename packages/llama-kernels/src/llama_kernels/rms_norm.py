"""RMSNorm: the normalisation Llama 3 applies before attention, before the feed-forward, and at the end.

Root-mean-square layer normalisation (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization",
arXiv:1910.07467) divides each row by its RMS and scales by a learned weight, without LayerNorm's
centring or bias. Llama 3 keeps the Llama architecture (Llama 3 paper, arXiv:2407.21783, §3.2), which
normalises the input of each sub-layer with RMSNorm ("pre-normalisation", Llama 1, arXiv:2302.13971,
§2.2). The numerics are exactly those of Meta's reference (`llama_models`, class `RMSNorm`) and of
Hugging Face's `LlamaRMSNorm`:

    y = (x.float() * rsqrt(mean(x.float() ** 2, -1) + eps)).to(x.dtype) * weight

statistics in float32 whatever x's dtype (float64 stays float64), the normalised row rounded back to
x's dtype, then multiplied by the weight; y has dtype `torch.promote_types(x.dtype, weight.dtype)`.

`rms_norm` is a `torch.library` custom op (`llama_kernels::rms_norm`, with its backward
`llama_kernels::rms_norm_backward`), so `torch.compile(fullgraph=True)` traces through it. Inside, it
runs the Triton kernels (`_triton_rms_norm`) or the PyTorch reference here, chosen by
`llama_kernels._backend.backend_for`. `rms_norm_reference` is the plain PyTorch formula.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from llama_kernels._backend import backend_for

__all__ = ["rms_norm", "rms_norm_reference"]

# dtypes rms_norm accepts. The Triton kernels cover the first three; float64 (a precision check,
# never a training dtype) always runs the PyTorch reference.
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SUPPORTED_DTYPES = (*_TRITON_DTYPES, torch.float64)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where the statistics are computed: float32 (Meta's `x.float()`), or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"rms_norm: x has dtype {x.dtype}; expected one of {_SUPPORTED_DTYPES}")
    if weight.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"rms_norm: weight has dtype {weight.dtype}; expected one of {_SUPPORTED_DTYPES}"
        )
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(
            f"rms_norm: x must have a non-empty last (hidden) dimension; got {x.shape}"
        )
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm: weight has shape {tuple(weight.shape)} but x has hidden size {x.shape[-1]} "
            f"(x shape {tuple(x.shape)}); weight must have shape ({x.shape[-1]},)"
        )
    if x.device != weight.device:
        raise ValueError(f"rms_norm: x is on {x.device} but weight is on {weight.device}")
    if isinstance(eps, bool) or not isinstance(eps, int | float):
        raise TypeError(f"rms_norm: eps must be a float; got {eps!r}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(
            f"rms_norm: eps must be a finite number > 0 (Llama 3 uses 1e-5); got {eps!r}"
        )


def _use_triton(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        backend_for(x) == "triton" and x.dtype in _TRITON_DTYPES and weight.dtype in _TRITON_DTYPES
    )


# ---------------------------------------------------------------------------------------------
# PyTorch reference: forward (with the rstd the backward needs) and backward.


def _forward_torch(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd): y as in the module docstring; rstd [...] = 1 / RMS of each row, in stats dtype."""
    x_stats = x.to(_stats_dtype(x.dtype))
    rstd = torch.rsqrt(x_stats.pow(2).mean(dim=-1) + eps)  # [...]
    normed = (x_stats * rstd.unsqueeze(-1)).to(x.dtype)
    return normed * weight, rstd


def _backward_torch(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight), computed in the stats dtype; the same math as the Triton backward.

    With xhat = x * rstd and g = grad_out * weight: dx = rstd * (g - xhat * mean(g * xhat, -1)),
    dweight = sum over rows of grad_out * normed (normed = xhat rounded to x's dtype, as in forward).
    """
    stats = _stats_dtype(x.dtype)
    rstd = rstd.unsqueeze(-1)  # [..., 1]
    xhat = x.to(stats) * rstd
    g = grad_out.to(stats) * weight.to(stats)
    dx = (g - xhat * (g * xhat).mean(dim=-1, keepdim=True)) * rstd
    normed = xhat.to(x.dtype).to(stats)
    acc = torch.promote_types(stats, weight.dtype)  # float32, or float64 for float64 weights
    dweight = (grad_out.to(acc) * normed.to(acc)).reshape(-1, x.shape[-1]).sum(dim=0)
    return dx.to(x.dtype), dweight.to(weight.dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in plain PyTorch (differentiable by autograd): Meta's Llama 3 formula, verbatim."""
    _check_inputs(x, weight, eps)
    return _forward_torch(x, weight, eps)[0]


# ---------------------------------------------------------------------------------------------
# Custom ops: what torch.compile sees. Inputs are made contiguous so both backends (and the fake
# implementations) return contiguous outputs.


@torch.library.custom_op("llama_kernels::rms_norm", mutates_args=())
def _rms_norm_op(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, rstd) of RMSNorm; rstd [...] (stats dtype) is kept for the backward."""
    return _forward(x, weight, eps)


def _forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's body: contiguous inputs, then the backend `_use_triton` picks."""
    x, weight = x.contiguous(), weight.contiguous()
    if _use_triton(x, weight):
        from llama_kernels import _triton_rms_norm

        return _triton_rms_norm.rms_norm_forward(x, weight, eps)
    y, rstd = _forward_torch(x, weight, eps)
    return y.contiguous(), rstd.contiguous()


@_rms_norm_op.register_fake
def _rms_norm_fake(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    rstd = x.new_empty(x.shape[:-1], dtype=_stats_dtype(x.dtype))
    return y, rstd


@torch.library.custom_op("llama_kernels::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) of RMSNorm, dispatched by the same rule as the forward."""
    grad_out, x = grad_out.contiguous(), x.contiguous()
    weight, rstd = weight.contiguous(), rstd.contiguous()
    if _use_triton(x, weight):
        from llama_kernels import _triton_rms_norm

        return _triton_rms_norm.rms_norm_backward(grad_out, x, weight, rstd)
    dx, dweight = _backward_torch(grad_out, x, weight, rstd)
    return dx.contiguous(), dweight


@_rms_norm_backward_op.register_fake
def _rms_norm_backward_fake(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    x, weight, _eps = inputs
    _y, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, rstd)


def _backward(
    ctx: Any, grad_y: torch.Tensor, _grad_rstd: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = _rms_norm_backward_op(grad_y, x, weight, rstd)
    return (
        dx if ctx.needs_input_grad[0] else None,
        dweight if ctx.needs_input_grad[1] else None,
        None,  # eps
    )


_rms_norm_op.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, with Meta's Llama 3 numerics; differentiable in x and weight.

    Args:
        x: [..., hidden], float16, bfloat16, float32 or float64; any strides.
        weight: [hidden], a floating dtype (float16, bfloat16, float32 or float64).
        eps: added to the mean square before the rsqrt; > 0 (Llama 3 uses 1e-5).

    Returns:
        [..., hidden], dtype `torch.promote_types(x.dtype, weight.dtype)`, contiguous.

    Runs the Triton kernels on CUDA and the PyTorch reference elsewhere (see `llama_kernels._backend`;
    float64 always takes the reference). Raises TypeError or ValueError naming the offending value.
    """
    _check_inputs(x, weight, eps)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if not needs_grad and not _use_triton(x, weight):
        # Inference on the reference backend: the same function the op would run, without the
        # custom-op dispatch (tens of microseconds per call, which a CPU decode step feels).
        return _forward(x, weight, float(eps))[0]
    y, _rstd = _rms_norm_op(x, weight, float(eps))
    return y

"""FP8 inference with row-wise scaling (§6.2 of "The Llama 3 Herd of Models", arXiv 2407.21783).

The paper serves Llama 3 405B with FP8 matrix multiplications in the feed-forward networks, not in
attention, and leaves the first and the last Transformer layers in BF16. Activations and weights
each get one scale per row ("row-wise quantization"), and the dynamic activation scales are capped
at 1200 so that a row with a huge outlier cannot blow its scale up and flush the row's other values
to zero. The production implementation is FBGEMM's row-wise FP8 (`quantize_fp8_row`,
`f8f8bf16_rowwise`, `matmul_fp8_row`); this module is the same recipe, small:

- `quantize_fp8_rowwise(x, scale_ub)`: x [..., K] → (x_fp8 [..., K] e4m3, scale [...] fp32) with
  scale = min(max|x_row|, scale_ub) / 448 and x ≈ x_fp8 · scale.
- `fp8_rowwise_matmul(x_fp8, x_scale, w_fp8, w_scale, *, bias, out_dtype)`: (x_fp8 @ w_fp8ᵀ) in fp32,
  times x_scale[:, None] · w_scale[None, :], plus bias, cast to out_dtype.
- `Fp8RowwiseLinear`: an nn.Linear replacement holding its weight in e4m3 with per-output-row scales.

Which of a model's matmuls use them (the paper's recipe: feed-forward only, first and last layers
in BF16) is model knowledge: `llama_serve.quantize_fp8` applies it to a `llama_model.Llama`.

Both ops are `torch.library` custom ops (`llama_kernels::quantize_fp8_rowwise`,
`llama_kernels::fp8_rowwise_matmul`) with fake implementations, so `torch.compile(fullgraph=True)`
traces through them; each runs its Triton kernel (`_triton_fp8.py`) or its PyTorch reference here,
as `llama_kernels._backend.backend_for` picks. Gradients are defined but this is inference code:
see `_quantize_backward` and `_matmul_backward` for exactly what flows where.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from llama_kernels._backend import backend_for

__all__ = [
    # ops
    "quantize_fp8_rowwise",
    "fp8_rowwise_matmul",
    # references
    "quantize_fp8_rowwise_reference",
    "fp8_rowwise_matmul_reference",
    # modules
    "Fp8RowwiseLinear",
    # constants
    "FP8_E4M3_MAX",
    "SCALE_UB",
]

FP8_DTYPE = torch.float8_e4m3fn  # e4m3 "fn": no infinities, one NaN pattern, max 448 (OCP FP8 spec)
FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn value, torch.finfo(torch.float8_e4m3fn).max
SCALE_UB = 1200.0  # §6.2: "upper bound the dynamic scaling factors to 1200"
# Floor of the row maximum (FBGEMM's eps) so an all-zero row gets a tiny finite scale, not 0 (which
# would make x / scale NaN). Rows whose maximum is below it quantize to (near) zero.
MIN_ROW_MAX = 1e-12
_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ---------------------------------------------------------------------------------------------
# PyTorch references (run everywhere; the oracles the Triton kernels are tested against)
# ---------------------------------------------------------------------------------------------


def quantize_fp8_rowwise_reference(x: Tensor, scale_ub: float = SCALE_UB) -> tuple[Tensor, Tensor]:
    """Row-wise FP8 quantization in plain PyTorch: see `quantize_fp8_rowwise`."""
    x32 = x.float().contiguous()  # contiguous outputs, as the Triton kernel and the fake give
    row_max = x32.abs().amax(dim=-1).clamp(max=scale_ub).clamp(min=MIN_ROW_MAX)  # [...]
    # A true division: `tensor / python_float` on CUDA multiplies by the rounded reciprocal, which
    # can differ in the last bit (the Triton kernel divides exactly, with tl.div_rn).
    scale = row_max / torch.full_like(row_max, FP8_E4M3_MAX)  # [...]
    scaled = (x32 / scale[..., None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)  # [..., K]
    return scaled.to(FP8_DTYPE), scale  # the cast rounds to nearest, ties to even


def fp8_rowwise_matmul_reference(
    x_fp8: Tensor,
    x_scale: Tensor,
    w_fp8: Tensor,
    w_scale: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """Row-wise-scaled FP8 matmul in plain PyTorch: dequantize to fp32, matmul, rescale.

    A product of two e4m3 values is exact in fp32, so this differs from the Triton kernel only in
    the order of the fp32 accumulation.
    """
    acc = x_fp8.float() @ w_fp8.float().T  # [..., N], fp32
    out = acc * x_scale[..., None] * w_scale  # [..., N]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Custom ops: backend dispatch, fake (meta) implementations, autograd formulas
# ---------------------------------------------------------------------------------------------


def _fp8_triton(x: Tensor) -> bool:
    """Run the Triton FP8 kernels? Only where FP8 exists in hardware: CUDA compute capability 8.9
    (Ada) or newer, e.g. H100; older GPUs (A100) use the reference, on the GPU, instead of failing
    to compile. On the CPU, Triton means its interpreter (TRITON_INTERPRET=1)."""
    if backend_for(x) != "triton":
        return False
    return x.device.type != "cuda" or torch.cuda.get_device_capability(x.device) >= (8, 9)


@torch.library.custom_op("llama_kernels::quantize_fp8_rowwise", mutates_args=())
def _quantize_fp8_rowwise_op(x: Tensor, scale_ub: float) -> tuple[Tensor, Tensor]:
    if _fp8_triton(x):
        from llama_kernels._triton_fp8 import quantize_fp8_rowwise_triton

        return quantize_fp8_rowwise_triton(x, scale_ub)
    return quantize_fp8_rowwise_reference(x, scale_ub)


@_quantize_fp8_rowwise_op.register_fake
def _quantize_fp8_rowwise_fake(x: Tensor, scale_ub: float) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=FP8_DTYPE), x.new_empty(x.shape[:-1], dtype=torch.float32)


def _quantize_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x, scale_ub = inputs
    _, scale = output
    ctx.save_for_backward(x, scale)
    ctx.scale_ub = scale_ub


def _quantize_backward(ctx: Any, grad_fp8: Tensor | None, grad_scale: Tensor | None) -> Any:
    """Straight-through estimator: the dequantized value x_fp8 · scale passes gradients as if it
    were x, except where x saturated.

    With q = x / s (rounding treated as the identity) and the scale s held constant,
    dL/dx = dL/dq / s. Holding s constant loses nothing: if the downstream graph uses q only through
    q · s (a dequantization, a scaled matmul), the terms through s cancel exactly under the
    estimator. An element saturates (x_fp8 = ±448 while |x| > 448 · s) only when its row's maximum
    exceeded `scale_ub`, i.e. exactly when |x| > scale_ub: those get zero gradient, as a clamp does.
    `grad_scale` is dropped (the scale is treated as a constant). Note that autograd hands us the
    gradient of the float8 output *in float8* (it casts every gradient to its tensor's dtype), so
    it is already rounded to e4m3 and non-finite beyond ±448; that is one reason
    `fp8_rowwise_matmul` refuses to produce such gradients.
    """
    x, scale = ctx.saved_tensors
    if grad_fp8 is None:
        return None, None
    passes = x.float().abs() <= ctx.scale_ub  # [..., K]: not saturated
    grad_x = torch.where(passes, grad_fp8.float() / scale[..., None], 0.0)
    return grad_x.to(x.dtype), None


_quantize_fp8_rowwise_op.register_autograd(
    _quantize_backward, setup_context=_quantize_setup_context
)


@torch.library.custom_op("llama_kernels::fp8_rowwise_matmul", mutates_args=())
def _fp8_rowwise_matmul_op(
    x_fp8: Tensor,
    x_scale: Tensor,
    w_fp8: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    if _fp8_triton(x_fp8):
        from llama_kernels._triton_fp8 import fp8_rowwise_matmul_triton

        return fp8_rowwise_matmul_triton(x_fp8, x_scale, w_fp8, w_scale, bias, out_dtype)
    return fp8_rowwise_matmul_reference(x_fp8, x_scale, w_fp8, w_scale, bias, out_dtype)


@_fp8_rowwise_matmul_op.register_fake
def _fp8_rowwise_matmul_fake(
    x_fp8: Tensor,
    x_scale: Tensor,
    w_fp8: Tensor,
    w_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    return x_fp8.new_empty((*x_fp8.shape[:-1], w_fp8.shape[0]), dtype=out_dtype)


def _matmul_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    x_fp8, x_scale, w_fp8, w_scale, bias, _ = inputs
    ctx.save_for_backward(x_fp8, x_scale, w_fp8, w_scale)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _matmul_backward(ctx: Any, grad_out: Tensor) -> Any:
    """Gradients of out = (x_fp8 @ w_fp8ᵀ) · x_scale[:, None] · w_scale[None, :] + bias.

    With P = x_fp8 @ w_fp8ᵀ (recomputed in fp32) and G = dL/dout [M, N]:
    dL/dx_scale[m] = Σ_n G[m, n] P[m, n] w_scale[n], dL/dw_scale[n] = Σ_m G[m, n] P[m, n]
    x_scale[m], dL/dbias[n] = Σ_m G[m, n]. There is deliberately no gradient for the float8
    operands: autograd would round it to e4m3 (and turn anything beyond ±448 into NaN), so asking
    for one raises instead of training silently on garbage.
    """
    x_fp8, x_scale, w_fp8, w_scale = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if needs[0] or needs[2]:
        operands = [name for name, n in (("x_fp8", needs[0]), ("w_fp8", needs[2])) if n]
        raise RuntimeError(
            f"fp8_rowwise_matmul has no gradient for its float8 operands ({', '.join(operands)} "
            "require grad): FP8 here is for inference (§6.2), and a gradient stored in float8 "
            "would be rounded to e4m3 and overflow past ±448. Run inference under "
            "torch.inference_mode() / torch.no_grad(), or keep the bf16 nn.Linear for training."
        )
    n = w_fp8.shape[0]
    grad = grad_out.float().reshape(-1, n)  # [M, N]
    grad_x_scale = grad_w_scale = grad_bias = None
    if needs[1] or needs[3]:
        unscaled = _fp8_rowwise_matmul_op(
            x_fp8,
            torch.ones_like(x_scale),
            w_fp8,
            torch.ones_like(w_scale),
            None,
            torch.float32,
        ).reshape(-1, n)  # [M, N]: P in fp32
        if needs[1]:
            grad_x_scale = (grad * unscaled * w_scale[None, :]).sum(1).reshape(x_scale.shape)
        if needs[3]:
            grad_w_scale = (grad * unscaled * x_scale.reshape(-1, 1)).sum(0)  # [N]
    if needs[4]:
        grad_bias = grad.sum(0).to(ctx.bias_dtype)  # [N]
    return None, grad_x_scale, None, grad_w_scale, grad_bias, None


_fp8_rowwise_matmul_op.register_autograd(_matmul_backward, setup_context=_matmul_setup_context)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _check_scale_ub(scale_ub: float) -> float:
    if isinstance(scale_ub, bool) or not isinstance(scale_ub, int | float):
        raise TypeError(f"scale_ub must be a positive float, got {scale_ub!r}")
    if not scale_ub > 0:  # also rejects NaN
        raise ValueError(
            f"scale_ub must be > 0 (the cap on a row's maximum; §6.2 uses {SCALE_UB}), "
            f"got {scale_ub!r}"
        )
    return float(scale_ub)


def quantize_fp8_rowwise(x: Tensor, scale_ub: float = SCALE_UB) -> tuple[Tensor, Tensor]:
    """Quantize `x` [..., K] to float8_e4m3fn with one scale per row.

    row_max = max(min(max|x_row|, scale_ub), 1e-12); scale = row_max / 448; x_fp8 =
    clamp(x / scale, ±448) rounded to nearest even. Returns (x_fp8 [..., K] float8_e4m3fn,
    scale [...] float32), and x ≈ x_fp8.float() * scale[..., None]. `scale_ub` is §6.2's upper
    bound on the dynamic scaling factor (pass `math.inf` for none): values beyond it saturate at
    ±448 · scale. A row containing NaN gets a NaN scale (its dequantized values are all NaN).
    """
    scale_ub = _check_scale_ub(scale_ub)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., K] with K >= 1, got shape {tuple(x.shape)}")
    x_fp8, scale = _quantize_fp8_rowwise_op(x, scale_ub)
    return x_fp8, scale


def fp8_rowwise_matmul(
    x_fp8: Tensor,
    x_scale: Tensor,
    w_fp8: Tensor,
    w_scale: Tensor,
    *,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    """(x_fp8 @ w_fp8ᵀ) · x_scale[..., None] · w_scale + bias, accumulated in fp32, as `out_dtype`.

    x_fp8 [..., K] and w_fp8 [N, K] (nn.Linear's weight layout) are float8_e4m3fn; x_scale [...]
    and w_scale [N] are their float32 row scales (from `quantize_fp8_rowwise`); bias [N] is any
    float dtype. Returns [..., N].
    """
    for name, t in (("x_fp8", x_fp8), ("w_fp8", w_fp8)):
        if t.dtype != FP8_DTYPE:
            raise TypeError(
                f"{name} must be {FP8_DTYPE} (quantize it with quantize_fp8_rowwise), got {t.dtype}"
            )
    for name, t in (("x_scale", x_scale), ("w_scale", w_scale)):
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
    if w_fp8.dim() != 2:
        raise ValueError(f"w_fp8 must be [N, K], got shape {tuple(w_fp8.shape)}")
    n, k = w_fp8.shape
    if x_fp8.dim() == 0 or x_fp8.shape[-1] != k or k == 0:
        raise ValueError(
            f"x_fp8 [..., K] and w_fp8 [N, K] must share K >= 1: x_fp8 has shape "
            f"{tuple(x_fp8.shape)}, w_fp8 has shape {tuple(w_fp8.shape)}"
        )
    if x_scale.shape != x_fp8.shape[:-1]:
        raise ValueError(
            f"x_scale must have shape x_fp8.shape[:-1] = {tuple(x_fp8.shape[:-1])} (one scale per "
            f"row), got {tuple(x_scale.shape)}"
        )
    if w_scale.shape != (n,):
        raise ValueError(
            f"w_scale must have shape [N] = {(n,)} (one per row of w_fp8 {tuple(w_fp8.shape)}), "
            f"got {tuple(w_scale.shape)}"
        )
    if bias is not None:
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape [N] = {(n,)}, got {tuple(bias.shape)}")
        if not bias.dtype.is_floating_point or bias.dtype == FP8_DTYPE:
            raise TypeError(f"bias must be float32, bfloat16 or float16, got {bias.dtype}")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    tensors = [x_fp8, x_scale, w_fp8, w_scale] + ([] if bias is None else [bias])
    if len({t.device for t in tensors}) > 1:
        raise ValueError(
            "all inputs must be on one device, got "
            + ", ".join(
                f"{name}: {t.device}"
                for name, t in zip(
                    ("x_fp8", "x_scale", "w_fp8", "w_scale", "bias"), tensors, strict=False
                )
            )
        )
    out: Tensor = _fp8_rowwise_matmul_op(x_fp8, x_scale, w_fp8, w_scale, bias, out_dtype)
    return out


class Fp8RowwiseLinear(nn.Module):
    """An inference-only nn.Linear with an e4m3 weight and row-wise scales (§6.2).

    The weight is quantized once, one scale per output row (weight_fp8 [N, K] float8_e4m3fn,
    weight_scale [N] float32; no `scale_ub` cap: the weight is static and its exact row maximum
    is known; the §6.2 bound is for the dynamic activation scales). Each forward quantizes the
    activations per row (token) with the cap `scale_ub` and returns the activations' dtype.
    Change the model's dtype before quantizing, not after: `.to(dtype)` casts float8 buffers too.
    """

    weight_fp8: Tensor
    weight_scale: Tensor
    bias: Tensor | None

    def __init__(
        self,
        weight_fp8: Tensor,
        weight_scale: Tensor,
        bias: Tensor | None = None,
        *,
        scale_ub: float = SCALE_UB,
    ) -> None:
        super().__init__()
        if weight_fp8.dtype != FP8_DTYPE or weight_fp8.dim() != 2:
            raise TypeError(
                f"weight_fp8 must be a [N, K] {FP8_DTYPE} tensor, got {weight_fp8.dtype} "
                f"of shape {tuple(weight_fp8.shape)}"
            )
        out_features, in_features = weight_fp8.shape
        if weight_scale.dtype != torch.float32 or weight_scale.shape != (out_features,):
            raise ValueError(
                f"weight_scale must be float32 of shape {(out_features,)}, got "
                f"{weight_scale.dtype} of shape {tuple(weight_scale.shape)}"
            )
        if bias is not None and bias.shape != (out_features,):
            raise ValueError(f"bias must have shape {(out_features,)}, got {tuple(bias.shape)}")
        self.in_features = in_features
        self.out_features = out_features
        self.scale_ub = _check_scale_ub(scale_ub)
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale_ub: float = SCALE_UB) -> Fp8RowwiseLinear:
        """Quantize `linear`'s weight (per output row) and copy its bias; `linear` is unchanged."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        scale_ub = _check_scale_ub(scale_ub)
        with torch.no_grad():
            weight_fp8, weight_scale = quantize_fp8_rowwise(linear.weight.detach(), math.inf)
            bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(weight_fp8, weight_scale, bias, scale_ub=scale_ub)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in_features] → [..., out_features] in x's dtype."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"expected input [..., {self.in_features}], got shape {tuple(x.shape)}"
            )
        x_fp8, x_scale = quantize_fp8_rowwise(x, self.scale_ub)  # [..., K], [...]
        return fp8_rowwise_matmul(
            x_fp8, x_scale, self.weight_fp8, self.weight_scale, bias=self.bias, out_dtype=x.dtype
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, scale_ub={self.scale_ub}"
        )

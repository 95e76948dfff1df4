"""Triton kernels for RMSNorm: a fused forward that keeps the per-row rstd, and a fused backward.

The math is that of `llama_kernels.rms_norm` (Zhang & Sennrich 2019, with Meta's Llama 3 numerics):
statistics in float32, the normalised row rounded to x's dtype, then multiplied by the weight. This
module is imported lazily, only when the Triton backend runs, and only for float16, bfloat16 and
float32 inputs (float64 stays on the PyTorch reference).

Design:
- Forward: one program per row. When the row fits in one block (hidden <= MAX_BLOCK, every Llama 3
  width up to 405B's 16,384) it is loaded once, kept in registers, reduced and written; wider rows are
  walked twice in MAX_BLOCK chunks (sum of squares, then normalise). The float32 rstd of each row is
  stored for the backward.
- Backward: a fixed number of programs (about two per SM), each owning a contiguous run of rows. For
  each row it writes dx and adds dy * normed into a float32 accumulator; at the end each program
  writes its accumulator as one row of a [n_programs, hidden] float32 buffer, which is summed over
  programs (in float32) and only then cast to the weight's dtype. The weight gradient is therefore
  never accumulated in bfloat16.
"""

# Triton's convention: compile-time (tl.constexpr) kernel parameters are UPPER_CASE.
# ruff: noqa: N803
# Kernel parameters are typed by Triton (pointers, scalars, tl.constexpr), not by Python annotations.
# mypy: disable-error-code="untyped-decorator,no-untyped-def"

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["MAX_BLOCK", "rms_norm_forward", "rms_norm_backward"]

# Widest row handled in a single pass: 16,384 = Llama 3 405B's hidden size. Wider rows are processed in
# chunks of this many columns (correct for any width, at the cost of reading each row twice).
MAX_BLOCK = 16384

# Programs in the backward when not on CUDA (the interpreter): any count is correct; a few keep the
# partial-sum reduction exercised without making the interpreter slower.
_CPU_BACKWARD_PROGRAMS = 8


@triton.jit
def _rms_norm_forward_kernel(
    x_ptr,  # [n_rows, n_cols], contiguous
    w_ptr,  # [n_cols]
    y_ptr,  # [n_rows, n_cols], contiguous, dtype promote(x, weight)
    rstd_ptr,  # [n_rows], float32
    n_cols,
    eps,
    BLOCK: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * n_cols
    y_row = y_ptr + row * n_cols
    cols = tl.arange(0, BLOCK)
    if SINGLE_PASS:
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        normed = (
            (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        )  # rounded to x's dtype, as Meta's
        tl.store(y_row + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        sum_sq = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            sum_sq += x * x
        rstd = tl.rsqrt(tl.sum(sum_sq, axis=0) / n_cols + eps)
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
            tl.store(y_row + start + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_backward_kernel(
    dy_ptr,  # [n_rows, n_cols], contiguous, dtype promote(x, weight)
    x_ptr,  # [n_rows, n_cols], contiguous
    w_ptr,  # [n_cols]
    rstd_ptr,  # [n_rows], float32
    dx_ptr,  # [n_rows, n_cols], contiguous, dtype of x
    dw_partial_ptr,  # [n_programs, n_cols], float32: one row of weight-gradient partial sums per program
    n_rows,
    n_cols,
    rows_per_program,
    BLOCK: tl.constexpr,
    SINGLE_PASS: tl.constexpr,
):
    # With xhat = x * rstd and g = dy * w (all float32):
    #   dx = rstd * (g - xhat * mean(g * xhat))       dweight = sum over rows of dy * normed,
    # where normed = xhat rounded to x's dtype, the value the forward actually multiplied by w.
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK)
    dw_row = dw_partial_ptr + pid.to(tl.int64) * n_cols
    # Offset of the current row in x, dy and dx; int64 so tensors past 2**31 elements are fine.
    offset = row_start.to(tl.int64) * n_cols
    if SINGLE_PASS:
        mask = cols < n_cols
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
        for row in range(row_start, row_end):
            x = tl.load(x_ptr + offset + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offset + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            xhat = x * rstd
            g = dy * w
            mean_g_xhat = tl.sum(g * xhat, axis=0) / n_cols
            dx = (g - xhat * mean_g_xhat) * rstd
            tl.store(dx_ptr + offset + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw_acc += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
            offset += n_cols
        tl.store(dw_row + cols, dw_acc, mask=mask)
    else:
        # The partial buffer arrives zeroed; this program is the only one touching its row, so the
        # read-add-write below has no races.
        for row in range(row_start, row_end):
            rstd = tl.load(rstd_ptr + row)
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                mask = start + cols < n_cols
                x = tl.load(x_ptr + offset + start + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + offset + start + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
                acc += dy * w * (x * rstd)
            mean_g_xhat = tl.sum(acc, axis=0) / n_cols
            for start in range(0, n_cols, BLOCK):
                mask = start + cols < n_cols
                x = tl.load(x_ptr + offset + start + cols, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(dy_ptr + offset + start + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(w_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = x * rstd
                dx = (dy * w - xhat * mean_g_xhat) * rstd
                tl.store(dx_ptr + offset + start + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
                normed = xhat.to(x_ptr.dtype.element_ty).to(tl.float32)
                dw = tl.load(dw_row + start + cols, mask=mask, other=0.0)
                tl.store(dw_row + start + cols, dw + dy * normed, mask=mask)
            offset += n_cols


def _block_config(n_cols: int) -> tuple[int, bool, int]:
    """(BLOCK, SINGLE_PASS, num_warps) for rows of `n_cols` columns."""
    block = min(triton.next_power_of_2(n_cols), MAX_BLOCK)
    # Enough threads that each holds at most ~16 fp32 values per live row vector (Llama 3 8B:
    # 4096 -> 8 warps; 70B: 8192 -> 16; 405B: 16384 -> 16, 32 values each), never fewer than 4.
    num_warps = 16 if block >= 8192 else 8 if block >= 2048 else 4
    return block, block >= n_cols, num_warps


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _backward_programs(device: torch.device, n_rows: int) -> int:
    if device.type == "cuda":
        # Two programs per SM: enough to keep every SM busy while the [n_programs, hidden]
        # partial buffer stays small next to x (a few MB at hidden 16,384).
        target = 2 * _sm_count(device.index if device.index is not None else 0)
    else:
        target = _CPU_BACKWARD_PROGRAMS
    return max(1, min(target, n_rows))


def rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of contiguous `x` [..., hidden]: (y [..., hidden] promoted dtype, rstd [...] float32)."""
    n_cols = x.shape[-1]
    x2d = x.reshape(-1, n_cols)  # [n_rows, hidden]
    n_rows = x2d.shape[0]
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if n_rows == 0:  # (hidden == 0 is rejected by rms_norm)
        return y, rstd
    block, single_pass, num_warps = _block_config(n_cols)
    _rms_norm_forward_kernel[(n_rows,)](
        x2d, weight, y, rstd, n_cols, eps,
        BLOCK=block, SINGLE_PASS=single_pass, num_warps=num_warps,
    )  # fmt: skip
    return y, rstd


def rms_norm_backward(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dx in x's dtype, dweight in weight's dtype) of RMSNorm, from the forward's rstd."""
    n_cols = x.shape[-1]
    x2d = x.reshape(-1, n_cols)  # [n_rows, hidden]
    dy2d = grad_out.reshape(-1, n_cols).contiguous()  # [n_rows, hidden]
    n_rows = x2d.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return dx, torch.zeros_like(weight)
    block, single_pass, num_warps = _block_config(n_cols)
    rows_per_program = triton.cdiv(n_rows, _backward_programs(x.device, n_rows))
    n_programs = triton.cdiv(n_rows, rows_per_program)
    # float32 partial sums, one row per program; zeroed because the chunked path adds into them.
    dw_partial = torch.zeros((n_programs, n_cols), dtype=torch.float32, device=x.device)
    _rms_norm_backward_kernel[(n_programs,)](
        dy2d, x2d, weight, rstd, dx, dw_partial, n_rows, n_cols, rows_per_program,
        BLOCK=block, SINGLE_PASS=single_pass, num_warps=num_warps,
    )  # fmt: skip
    dweight = dw_partial.sum(dim=0).to(weight.dtype)  # reduced in float32, rounded once
    return dx, dweight

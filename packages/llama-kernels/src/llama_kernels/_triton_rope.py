"""Triton kernel for RoPE: queries and keys of one token rotated by one program, in one launch.

Imported lazily by `llama_kernels.rope` the first time the Triton backend runs. The math is the
reference's (`rope.apply_rope_reference`): angle = float32(position) · inv_freq (one float32
product), cos and sin in float32, the rotation in float32, the result cast to the input dtype.

Grid: (B·T tokens, head blocks). Program (token, j) loads the token's position once, computes
cos and sin for the head_dim/2 frequencies once, and rotates q heads [j·BLOCK_Q, (j+1)·BLOCK_Q)
and k heads [j·BLOCK_K, (j+1)·BLOCK_K) with them. Head blocks are sized so that one program moves
about 4K elements of q (a whole Llama 3 8B token: 32 heads x 128), and BLOCK_K is chosen so that
the same number of blocks covers the k heads, whatever the ratio of head counts.

Strides: q, k and positions are read with their own strides on every dimension but the last, so
views of a fused QKV projection or of a transposed [B, H, T, D] tensor are used without a copy; a
tensor whose last dimension is not contiguous (stride != 1) is copied first. Outputs are new
contiguous tensors. The backward is the same kernel with the sine negated (rotation by -angle).
"""

# Triton's convention: compile-time (tl.constexpr) kernel parameters are UPPER_CASE.
# ruff: noqa: N803
# Kernel parameters are typed by Triton (pointers, scalars, tl.constexpr), not by Python annotations.
# mypy: disable-error-code="untyped-decorator,no-untyped-def"

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rope_triton"]

# About 4K elements of q per program: a whole Llama 3 8B token (32 heads x 128) in one program.
_ELEMENTS_PER_PROGRAM = 4096
# Enough programs to give each of an H100's 132 SMs several: then fewer warps a program is best.
_MANY_PROGRAMS = 1024


@triton.jit
def _rotate_heads(
    x_ptr,  # this token's first head of the input
    x_stride_h,
    out_ptr,  # this token's first head of the (contiguous) output
    n_heads,
    head_start,
    cos,  # [BLOCK_HALF] float32
    sin,  # [BLOCK_HALF] float32
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    heads = head_start + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    head_mask = heads[:, None] < n_heads  # [BLOCK_H, 1]
    x_rows = x_ptr + heads[:, None] * x_stride_h  # [BLOCK_H, 1]
    out_rows = out_ptr + heads[:, None] * (2 * HALF)
    out_ty = out_ptr.dtype.element_ty
    c = cos[None, :]  # [1, BLOCK_HALF]
    s = sin[None, :]
    if INTERLEAVED:
        # Pairs (x[2i], x[2i+1]), Meta's layout: load whole rows (contiguous, vectorized), then
        # split the even and odd elements in registers; strided loads would be ~5x slower.
        dim = tl.arange(0, 2 * BLOCK_HALF)  # [2·BLOCK_HALF]
        mask = head_mask & (dim[None, :] < 2 * HALF)  # [BLOCK_H, 2·BLOCK_HALF]
        x = tl.load(x_rows + dim[None, :], mask=mask, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_HALF, 2)))  # [BLOCK_H, BLOCK_HALF] each
        y = tl.join(x1 * c - x2 * s, x2 * c + x1 * s)  # [BLOCK_H, BLOCK_HALF, 2]
        y = tl.reshape(y, (BLOCK_H, 2 * BLOCK_HALF))
        tl.store(out_rows + dim[None, :], y.to(out_ty), mask=mask)
    else:
        # Pairs (x[i], x[i + head_dim/2]), Hugging Face's layout: two contiguous half rows.
        pair = tl.arange(0, BLOCK_HALF)  # [BLOCK_HALF]
        mask = head_mask & (pair[None, :] < HALF)  # [BLOCK_H, BLOCK_HALF]
        x1 = tl.load(x_rows + pair[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_rows + HALF + pair[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(out_rows + pair[None, :], (x1 * c - x2 * s).to(out_ty), mask=mask)
        tl.store(out_rows + HALF + pair[None, :], (x2 * c + x1 * s).to(out_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    positions_ptr,
    inv_freq_ptr,
    seq_len,
    q_stride_b,
    q_stride_t,
    q_stride_h,
    k_stride_b,
    k_stride_t,
    k_stride_h,
    positions_stride_b,
    positions_stride_t,
    n_q_heads,
    n_k_heads,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    INVERSE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)  # b·T + t; int64 so offsets of large tensors fit
    head_block = tl.program_id(1)
    b = token // seq_len
    t = token % seq_len

    # Angles once per token: float32(position) · inv_freq, one float32 product as in the reference.
    position = tl.load(positions_ptr + b * positions_stride_b + t * positions_stride_t)
    pair = tl.arange(0, BLOCK_HALF)
    inv_freq = tl.load(inv_freq_ptr + pair, mask=pair < HALF, other=0.0)
    angle = position.to(tl.float32) * inv_freq  # [BLOCK_HALF]
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    if INVERSE:
        sin = -sin  # the backward: rotation by -angle

    _rotate_heads(
        q_ptr + b * q_stride_b + t * q_stride_t,
        q_stride_h,
        q_out_ptr + token * n_q_heads * (2 * HALF),
        n_q_heads,
        head_block * BLOCK_Q,
        cos,
        sin,
        HALF,
        BLOCK_HALF,
        BLOCK_Q,
        INTERLEAVED,
    )
    _rotate_heads(
        k_ptr + b * k_stride_b + t * k_stride_t,
        k_stride_h,
        k_out_ptr + token * n_k_heads * (2 * HALF),
        n_k_heads,
        head_block * BLOCK_K,
        cos,
        sin,
        HALF,
        BLOCK_HALF,
        BLOCK_K,
        INTERLEAVED,
    )


def _launch_config(
    n_tokens: int, n_q_heads: int, n_k_heads: int, head_dim: int
) -> tuple[int, int, int, int]:
    """(head blocks, BLOCK_Q, BLOCK_K, num_warps) for `n_tokens` tokens of these head counts."""
    block_half = triton.next_power_of_2(head_dim // 2)
    max_heads = max(1, _ELEMENTS_PER_PROGRAM // (2 * block_half))
    n_blocks = max(1, triton.cdiv(n_q_heads, max_heads), triton.cdiv(n_k_heads, max_heads))
    block_q = triton.next_power_of_2(max(1, triton.cdiv(n_q_heads, n_blocks)))
    block_k = triton.next_power_of_2(max(1, triton.cdiv(n_k_heads, n_blocks)))
    elements = (block_q + block_k) * 2 * block_half
    # Measured on an H100 (Llama 3 8B/70B/405B head counts, bf16, 8K-32K tokens): 2 warps a
    # program run at the copy bandwidth (~2.65 TB/s for half-split), 4 lose up to ~15%, 8 ~20%.
    # With few programs (decoding: one token per sequence) more warps shorten each program; there
    # the launch, not the kernel, dominates, so this choice is not measurable.
    if n_tokens * n_blocks >= _MANY_PROGRAMS:
        num_warps = 2 if elements >= 1024 else 1
    else:
        num_warps = 4 if elements >= 2048 else 2 if elements >= 512 else 1
    return n_blocks, block_q, block_k, num_warps


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def rope_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    interleaved: bool,
    inverse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, T, Hq, D] and k [B, T, Hk, D] by positions ([T], [1, T] or [B, T]) · inv_freq.

    Inputs are assumed checked (`rope.apply_rope` does). Returns new contiguous tensors.
    """
    batch, seq_len, n_q_heads, head_dim = q.shape
    n_k_heads = k.shape[2]
    q = _last_dim_contiguous(q)
    k = _last_dim_contiguous(k)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if batch * seq_len == 0 or n_q_heads + n_k_heads == 0:
        return q_out, k_out
    positions_2d = positions if positions.ndim == 2 else positions[None]  # [B or 1, T]
    positions_stride_b = positions_2d.stride(0) if positions_2d.shape[0] > 1 else 0
    inv_freq = inv_freq.contiguous()

    n_blocks, block_q, block_k, num_warps = _launch_config(
        batch * seq_len, n_q_heads, n_k_heads, head_dim
    )
    grid = (batch * seq_len, n_blocks)
    _rope_kernel[grid](
        q,
        k,
        q_out,
        k_out,
        positions_2d,
        inv_freq,
        seq_len,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        positions_stride_b,
        positions_2d.stride(1),
        n_q_heads,
        n_k_heads,
        HALF=head_dim // 2,
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        BLOCK_Q=block_q,
        BLOCK_K=block_k,
        INTERLEAVED=interleaved,
        INVERSE=inverse,
        num_warps=num_warps,
    )
    return q_out, k_out

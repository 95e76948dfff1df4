"""Triton kernels for FP8 row-wise quantization and the row-wise-scaled FP8 GEMM (§6.2).

Imported lazily by `llama_kernels.fp8`, only when the Triton backend runs, so that importing
llama_kernels never needs Triton and `TRITON_INTERPRET=1` may be set late (see `_backend.py`).

`_quantize_fp8_rowwise_kernel`: one program per BLOCK_M rows (several rows when K is small), two
passes over them: the absolute maximum (NaN-propagating, like torch's `amax`), then x / scale,
clamped to ±448 and rounded to e4m3. The rounding is done in-kernel, exactly, by
`_round_to_e4m3_grid` (round to nearest, ties to even, as torch's `.to(torch.float8_e4m3fn)`); the
final `.to(tl.float8e4nv)` then only re-encodes a value that e4m3 holds exactly. Why: Triton's
interpreter (3.x) converts fp32 to fp8 by adding the first dropped bit to the mantissa without
carrying into the exponent, so a value that rounds up to a power of two (31.6 → 32) comes out halved
(16), and ties round away from zero. On a GPU `cvt.rn.satfinite.e4m3x2.f32` would be right anyway;
the explicit rounding costs a few integer operations in a memory-bound kernel and makes the tested
code path and the GPU's the same, bit for bit. The scale and x / scale use `tl.div_rn` (IEEE
division, as torch does), not Triton's default approximate fp32 division, so scales and bytes match
the PyTorch reference exactly.

`_fp8_rowwise_matmul_kernel`: C = (A @ Bᵀ) · a_scale[:, None] · b_scale[None, :] (+ bias) with A
[M, K] e4m3 activations and B [N, K] e4m3 weights in nn.Linear's layout. A tiled GEMM in the style
of Triton's matmul tutorial: each program computes a [BLOCK_M, BLOCK_N] tile, looping over K in
BLOCK_K steps with `tl.dot` on fp8 operands into an fp32 accumulator; programs are ordered in groups
of GROUP_M tile-rows so that consecutive programs reuse the same B tiles from L2. Hopper's fp8
`wgmma` needs both operands K-major in shared memory: A's tiles are row-major [BLOCK_M, BLOCK_K]
and B's [BLOCK_K, BLOCK_N] tiles are read straight from the [N, K] weight (K contiguous), so no
transpose is needed. Hopper's fp8 tensor cores accumulate in reduced precision (about 14 bits,
DeepSeek-V3 §3.3.2); with `PRECISE_ACC` the partial sums are promoted to the fp32 accumulator once
per BLOCK_K (`max_num_imprecise_acc=BLOCK_K`), FBGEMM's `fp8_fast_accum=False`. The row scales,
the bias and the output cast live in the epilogue; a bf16 output is rounded to nearest even by
`_round_to_bf16_grid` before the cast, because the interpreter's fp32 → bf16 cast truncates (on a
GPU the cast rounds already; the explicit rounding is a few integer operations per output element).
The interpreter runs `tl.dot` on fp8 operands correctly (it widens them to fp16, exact for e4m3,
and multiplies in numpy with an fp32 result), so the GEMM needs no interpreter-only path.
"""

# Triton's convention: compile-time (tl.constexpr) kernel parameters are UPPER_CASE.
# ruff: noqa: N803
# Kernel parameters are typed by Triton (pointers, scalars, tl.constexpr), not by Python annotations.
# mypy: disable-error-code="untyped-decorator,no-untyped-def"

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llama_kernels._backend import _interpreting
from llama_kernels.fp8 import FP8_E4M3_MAX, MIN_ROW_MAX

__all__ = ["fp8_rowwise_matmul_triton", "quantize_fp8_rowwise_triton"]

_INTERPRETING = _interpreting()
# Promote Hopper's reduced-precision fp8 partial sums to fp32 once per BLOCK_K (see docstring).
PRECISE_ACC = True


# ---------------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------------


@triton.jit
def _round_to_e4m3_grid(y):
    """Round fp32 `y` (|y| <= 448) to the nearest float8_e4m3fn value, ties to even; fp32 out."""
    bits = y.to(tl.uint32, bitcast=True)
    sign = bits & 0x80000000
    magnitude = bits & 0x7FFFFFFF
    # Normal e4m3 numbers (|y| >= 2^-6): keep 3 of fp32's 23 mantissa bits. Adding 0x7FFFF plus the
    # lowest kept bit, then truncating, rounds to nearest with ties to even; a carry out of the
    # mantissa correctly bumps the exponent.
    lowest_kept = (magnitude >> 20) & 1
    normal = (magnitude + 0x7FFFF + lowest_kept) & 0xFFF00000
    # Subnormal e4m3 numbers (|y| < 2^-6) are the multiples of 2^-9: scale by 2^9 (exact), round to
    # an integer with fp32's own ties-to-even addition of 2^23, and scale back (exact).
    abs_y = magnitude.to(tl.float32, bitcast=True)
    steps = (abs_y * 512.0 + 8388608.0) - 8388608.0
    subnormal = (steps * 0.001953125).to(tl.uint32, bitcast=True)
    rounded = tl.where(magnitude >= 0x3C800000, normal, subnormal)  # 0x3C800000 is 2^-6
    out = (rounded | sign).to(tl.float32, bitcast=True)
    return tl.where(y != y, y, out)  # NaN stays NaN (the bit trick would turn it into a number)


@triton.jit
def _round_to_bf16_grid(y):
    """Round fp32 `y` to the nearest bfloat16 value, ties to even (inf and NaN stay); fp32 out."""
    bits = y.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(y != y, y, rounded.to(tl.float32, bitcast=True))  # NaN stays NaN


@triton.jit
def _quantize_fp8_rowwise_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    M,
    K,
    stride_x_row,
    stride_q_row,
    scale_ub,
    FP8_MAX: tl.constexpr,
    MIN_MAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_x_row  # [BLOCK_M, 1]
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_q_row
    cols = tl.arange(0, BLOCK_K)

    # Pass 1: each row's absolute maximum (a NaN makes it NaN, as torch.amax does).
    running_max = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        mask = row_mask[:, None] & (start + cols[None, :] < K)
        x = tl.load(x_rows + start + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        running_max = tl.maximum(running_max, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)
    # tl.max drops NaNs on a GPU, so a NaN lane is carried separately. (A custom NaN-propagating
    # combine function for tl.reduce would work too, but the interpreter runs those one element at
    # a time: 100x slower.)
    has_nan = tl.max((running_max != running_max).to(tl.int32), axis=1) > 0  # [BLOCK_M]
    row_max = tl.where(has_nan, float("nan"), tl.max(running_max, axis=1))  # [BLOCK_M]
    row_max = tl.minimum(row_max, scale_ub, propagate_nan=tl.PropagateNan.ALL)  # §6.2 upper bound
    row_max = tl.maximum(row_max, MIN_MAX, propagate_nan=tl.PropagateNan.ALL)
    scale = tl.div_rn(row_max, tl.full([BLOCK_M], FP8_MAX, tl.float32))  # [BLOCK_M]
    tl.store(scale_ptr + rows, scale, mask=row_mask)

    # Pass 2: x / scale, saturated to the e4m3 range, rounded to nearest even, stored as e4m3.
    for start in range(0, K, BLOCK_K):
        mask = row_mask[:, None] & (start + cols[None, :] < K)
        x = tl.load(x_rows + start + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.div_rn(x, tl.broadcast_to(scale[:, None], [BLOCK_M, BLOCK_K]))
        y = tl.minimum(
            tl.maximum(y, -FP8_MAX, propagate_nan=tl.PropagateNan.ALL),
            FP8_MAX,
            propagate_nan=tl.PropagateNan.ALL,
        )  # saturate, but keep a NaN a NaN (the default NaN rule on a GPU would clamp it)
        # Stored as the e4m3 bit pattern through a uint8 view: a NaN is written as e4m3's NaN, 0x7F
        # (what torch's cast gives), explicitly: the interpreter's fp8 cast does not keep NaN.
        q = _round_to_e4m3_grid(y).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        q = tl.where(y != y, tl.full(q.shape, 0x7F, tl.uint8), q)
        tl.store(q_rows + start + cols[None, :], q, mask=mask)


# Elements one quantization program covers per K step: small K packs several rows per program.
_QUANTIZE_TILE = 4096


def quantize_fp8_rowwise_triton(
    x: torch.Tensor, scale_ub: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launch for `llama_kernels.fp8.quantize_fp8_rowwise` (inputs already validated)."""
    shape = x.shape
    k = shape[-1]
    x2 = x.reshape(-1, k)  # [M, K]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    q = torch.empty((rows, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows,), dtype=torch.float32, device=x.device)
    if rows > 0:
        block_k = min(triton.next_power_of_2(k), 8192)
        block_m = min(triton.next_power_of_2(rows), max(_QUANTIZE_TILE // block_k, 1))
        _quantize_fp8_rowwise_kernel[(triton.cdiv(rows, block_m),)](
            x2,
            q.view(torch.uint8),
            scale,
            rows,
            k,
            x2.stride(0),
            q.stride(0),
            float(scale_ub),
            FP8_MAX=FP8_E4M3_MAX,
            MIN_MAX=MIN_ROW_MAX,
            BLOCK_M=block_m,
            BLOCK_K=block_k,
            num_warps=min(max(block_m * block_k // 512, 1), 8),
        )
    return q.reshape(shape), scale.reshape(shape[:-1])


# ---------------------------------------------------------------------------------------------
# GEMM
# ---------------------------------------------------------------------------------------------


def _matmul_configs() -> list[triton.Config]:
    """Autotuning candidates: H100-sized tiles; one small tile under the CPU interpreter.

    fp8 is one byte, so BLOCK_K = 128 is a 128-byte row per tile, the width of Hopper's shared
    memory swizzle. A [128, 256] tile with 3 stages uses (128 + 256) · 128 · 3 = 144 KiB of shared
    memory, within the H100's 227 KiB; the [64, *] tiles serve small M (decode), where the GEMM is
    bound by reading the weight.
    """
    if _INTERPRETING:
        # Small tiles and GROUP_M = 2, so that the test shapes exercise several programs, partial
        # groups and partial tiles in M, N and K.
        return [
            triton.Config(
                {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2},
                num_stages=1,
                num_warps=4,
            )
        ]
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps)
        (128, 256, 128, 3, 8),
        (128, 128, 128, 4, 8),
        (128, 64, 128, 4, 4),
        (64, 128, 128, 4, 4),
        (64, 64, 128, 5, 4),
    ]
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
            num_stages=stages,
            num_warps=warps,
        )
        for bm, bn, bk, stages, warps in shapes
    ]


@triton.autotune(configs=_matmul_configs(), key=["M_BUCKET", "N", "K"])
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _fp8_rowwise_matmul_kernel(
    a_ptr,  # [M, K] e4m3 activations
    b_ptr,  # [N, K] e4m3 weights
    c_ptr,  # [M, N] output
    a_scale_ptr,  # [M] fp32
    b_scale_ptr,  # [N] fp32
    bias_ptr,  # [N] or None
    M,
    N,
    K,
    M_BUCKET,  # autotuning key only: M rounded up to a power of two (one tuning per bucket)
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    HAS_BIAS: tl.constexpr,
    PRECISE_ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    # Grouped program order: GROUP_M tile-rows are swept together, column by column, so the B
    # tiles a group reads stay in L2 while its programs run.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows and columns past the edge wrap around to valid ones (loads stay in bounds, no mask in
    # M or N in the main loop); their results are dropped by the store's mask.
    rows_a = (offs_m % M).to(tl.int64)
    rows_b = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + rows_a[:, None] * stride_am + offs_k[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + rows_b[None, :] * stride_bn  # [BLOCK_K, BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K if PRECISE_ACC else None)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # Epilogue: row scales of A and B, bias, cast.
    a_scale = tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
    b_scale = tl.load(b_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
    acc = acc * a_scale[:, None] * b_scale[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    if c_ptr.dtype.element_ty == tl.bfloat16:
        # The interpreter's fp32 → bf16 cast truncates; rounding first makes the cast exact.
        acc = _round_to_bf16_grid(acc)
    c = acc.to(c_ptr.dtype.element_ty)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, c, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def fp8_rowwise_matmul_triton(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Triton launch for `llama_kernels.fp8.fp8_rowwise_matmul` (inputs already validated)."""
    k = x_fp8.shape[-1]
    n = w_fp8.shape[0]
    a = x_fp8.reshape(-1, k)  # [M, K]
    if a.stride(-1) != 1:
        a = a.contiguous()
    b = w_fp8 if w_fp8.stride(-1) == 1 else w_fp8.contiguous()  # [N, K], K contiguous
    a_scale = x_scale.reshape(-1).contiguous()  # [M]
    b_scale = w_scale.contiguous()  # [N]
    bias_c = None if bias is None else bias.contiguous()
    m = a.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=x_fp8.device)
    if m > 0 and n > 0:

        def grid(meta: dict[str, int]) -> tuple[int]:
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        _fp8_rowwise_matmul_kernel[grid](
            a,
            b,
            c,
            a_scale,
            b_scale,
            bias_c,
            m,
            n,
            k,
            min(triton.next_power_of_2(m), 4096),
            a.stride(0),
            a.stride(1),
            b.stride(0),
            b.stride(1),
            c.stride(0),
            c.stride(1),
            HAS_BIAS=bias_c is not None,
            PRECISE_ACC=PRECISE_ACC,
        )
    return c.reshape(*x_fp8.shape[:-1], n)

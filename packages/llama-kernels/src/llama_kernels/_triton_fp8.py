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

The GEMM: C = (A @ Bᵀ) · a_scale[:, None] · b_scale[None, :] (+ bias) with A [M, K] e4m3
activations and B [N, K] e4m3 weights in nn.Linear's layout, in two kernels that share the tile
order (`_tile_coordinates`: GROUP_M tile-rows swept together so that B tiles stay in L2) and the
epilogue (`_scaled_epilogue`: row scales, bias, cast).

- `_fp8_matmul_tma_kernel` (Hopper and newer, rows 16-byte aligned, i.e. K % 16 == 0): persistent
  (one program per SM looping over tiles) and fed by the tensor-memory accelerator through host-side
  `TensorDescriptor`s (Triton 3.4+; not the experimental descriptor API that Triton 3.x removed).
  The copy engine zero-fills out-of-bounds rows, columns and the K tail, and clips the output store,
  so the kernel has no masks. The output is stored in two half-width pieces (EPILOGUE_SUBTILE) to
  halve the shared memory it is staged in. The interpreter runs the same kernel.
- `_fp8_matmul_pointer_kernel` (everything else, e.g. Ada, or K % 16 != 0): one program per tile
  in the style of Triton's matmul tutorial; rows and columns past the edge wrap around to valid ones
  and are masked at the store, K's tail is masked.

Both loop over K in BLOCK_K steps with `tl.dot` on fp8 operands (both K-major, as Hopper's fp8
`wgmma` needs; B's [BLOCK_N, BLOCK_K] tiles are read straight from the [N, K] weight) into an fp32
accumulator. Hopper's fp8 tensor cores accumulate in reduced precision (about 14 bits,
DeepSeek-V3 §3.3.2); with `PRECISE_ACC` the partial sums are promoted to the fp32 accumulator once
per BLOCK_K = 128 (`max_num_imprecise_acc=BLOCK_K`), as FBGEMM's `fp8_fast_accum=False` and
`torch._scaled_mm(use_fast_accum=False)` do. That promotion is what bounds this GEMM on an H100:
in a sweep (2026-11-22, Triton 3.6) the TMA kernel reached about 1000 TFLOP/s at 8192³ with it and
1325 without it. Our reading, not checked in the SASS: Triton adds each chunk in only after its
`wgmma`s have finished, while CUTLASS (behind `torch._scaled_mm`) overlaps those adds with another
warpgroup's `wgmma`s ("ping-pong"), which Triton 3.6 does not express. A bf16 output is rounded to nearest even by
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

from typing import Any, Literal

import torch
import triton
import triton.language as tl

try:  # host-side tensor descriptors (TMA), Triton 3.4+
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the pointer kernel only
    TensorDescriptor = None

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


@triton.jit
def _tile_coordinates(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M tile-rows are swept together, column by column, so the B tiles
    a group reads stay in L2 while its tiles are computed."""
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (tile_id // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _scaled_epilogue(
    acc, offs_m, offs_n, M, N, a_scale_ptr, b_scale_ptr, bias_ptr, out_dtype, HAS_BIAS: tl.constexpr
):
    """acc · a_scale[:, None] · b_scale[None, :] (+ bias), rounded and cast to `out_dtype`."""
    a_scale = tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
    b_scale = tl.load(b_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
    acc = acc * a_scale[:, None] * b_scale[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    if out_dtype == tl.bfloat16:
        # The interpreter's fp32 → bf16 cast truncates; rounding first makes the cast exact.
        acc = _round_to_bf16_grid(acc)
    return acc.to(out_dtype)


# --- Hopper: persistent, TMA-fed -------------------------------------------------------------


def _set_block_shapes(nargs: dict[str, Any]) -> None:
    """Autotuner pre-hook: the host-side descriptors' block shapes follow the config's tiles."""
    block_m, block_n, block_k = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [block_m, block_k]
    nargs["b_desc"].block_shape = [block_n, block_k]
    subtiles = 2 if nargs["EPILOGUE_SUBTILE"] else 1
    nargs["c_desc"].block_shape = [block_m, block_n // subtiles]


def _tma_configs() -> list[triton.Config]:
    """Autotuning candidates of the TMA kernel; one small config under the CPU interpreter.

    From a sweep on an H100 (Triton 3.6; M = N = K = 8192 and two FFN shapes, fp32 promotion on):
    [128, 256] tiles with 8 warps were fastest (about 1000 TFLOP/s), although the two accumulators
    that the promotion needs (fp32 total + tensor-core partial, 128 registers each per thread) make
    ptxas spill a few registers; [128, 128] with 6 stages came within 3%. Slower, and left out:
    16 warps on [128, 256] or [256, 128] (no spills, but [64, 128] wgmma per warpgroup: 850-960),
    BLOCK_K = 64 (promotion twice as often: 650), two programs per SM with a 128-register cap
    (spills: 710-910), and `warp_specialize=True` (no gain on Hopper). [64, 128] serves small M.
    """
    if _INTERPRETING:
        # Tiny tiles, GROUP_M = 2 and a split epilogue, so that the test shapes exercise partial
        # tiles, partial groups, several tiles per program and both halves of the store.
        return [
            triton.Config(
                {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "EPILOGUE_SUBTILE": True},
                num_stages=1, num_warps=4, pre_hook=_set_block_shapes,
            )
        ]  # fmt: skip
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps, EPILOGUE_SUBTILE)
        (128, 256, 128, 3, 8, True),
        (128, 128, 128, 6, 8, True),
        (64, 128, 128, 4, 4, False),
    ]
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "EPILOGUE_SUBTILE": sub},
            num_stages=stages, num_warps=warps, pre_hook=_set_block_shapes,
        )
        for bm, bn, bk, stages, warps, sub in shapes
    ]  # fmt: skip


@triton.jit
def _fp8_matmul_tma_kernel(
    a_desc,  # [M, K] e4m3 activations, [BLOCK_M, BLOCK_K] blocks
    b_desc,  # [N, K] e4m3 weights, [BLOCK_N, BLOCK_K] blocks
    c_desc,  # [M, N] output, [BLOCK_M, BLOCK_N // (1 + EPILOGUE_SUBTILE)] blocks
    a_scale_ptr,  # [M] fp32
    b_scale_ptr,  # [N] fp32
    bias_ptr,  # [N] or None
    M,
    N,
    K,
    M_BUCKET,  # autotuning key only: M rounded up to a power of two (one tuning per bucket)
    HAS_BIAS: tl.constexpr,
    PRECISE_ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EPILOGUE_SUBTILE: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    out_dtype = c_desc.dtype
    # Persistent: one program per SM walks the tiles, so that a tile's epilogue (scales, cast,
    # asynchronous store) overlaps the next tile's first loads.
    for tile_id in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        pid_m, pid_n = _tile_coordinates(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            # Out-of-bounds rows, columns and the K tail are zero-filled by the copy engine.
            a = a_desc.load([off_m, ki * BLOCK_K])  # [BLOCK_M, BLOCK_K]
            b = b_desc.load([off_n, ki * BLOCK_K])  # [BLOCK_N, BLOCK_K]
            acc = tl.dot(a, b.T, acc, max_num_imprecise_acc=BLOCK_K if PRECISE_ACC else None)
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        c = _scaled_epilogue(
            acc, offs_m, offs_n, M, N, a_scale_ptr, b_scale_ptr, bias_ptr, out_dtype, HAS_BIAS
        )
        # The store clips rows and columns past the edge.
        if EPILOGUE_SUBTILE:
            # Two half-width stores: half the shared-memory staging buffer.
            c = tl.permute(tl.reshape(c, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            c_left, c_right = tl.split(c)  # [BLOCK_M, BLOCK_N // 2] each
            c_desc.store([off_m, off_n], c_left)
            c_desc.store([off_m, off_n + BLOCK_N // 2], c_right)
        else:
            c_desc.store([off_m, off_n], c)


_fp8_matmul_tma_autotuned = triton.autotune(configs=_tma_configs(), key=["M_BUCKET", "N", "K"])(
    _fp8_matmul_tma_kernel
)


# --- Everywhere else: plain pointers ---------------------------------------------------------


def _pointer_configs() -> list[triton.Config]:
    """Autotuning candidates of the pointer kernel: H100-sized tiles; one small tile under the
    CPU interpreter.

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


@triton.jit
def _fp8_matmul_pointer_kernel(
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
    pid_m, pid_n = _tile_coordinates(
        tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M
    )
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

    c = _scaled_epilogue(
        acc, offs_m, offs_n, M, N, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr.dtype.element_ty,
        HAS_BIAS,
    )  # fmt: skip
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, c, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


_fp8_matmul_pointer_autotuned = triton.autotune(
    configs=_pointer_configs(), key=["M_BUCKET", "N", "K"]
)(
    triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(
        _fp8_matmul_pointer_kernel
    )
)


# --- Launch ----------------------------------------------------------------------------------

GemmKernel = Literal["tma", "pointer"]


def _tma_usable(*tensors: torch.Tensor) -> bool:
    """The TMA kernel runs on Hopper or newer (and in the interpreter) when every 2-D operand's
    rows start 16-byte aligned, as the copy engine requires (K % 16 == 0 for fp8 operands)."""
    if TensorDescriptor is None:
        return False
    device = tensors[0].device
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        return False
    return all(
        t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 and t.stride(1) == 1
        for t in tensors
    )


def _num_programs(device: torch.device) -> int:
    """Programs of the persistent grid: one per SM (3 in the interpreter, to loop over tiles)."""
    if device.type != "cuda":
        return 3
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def fp8_rowwise_matmul_triton(
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    *,
    kernel: GemmKernel | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Triton launch for `llama_kernels.fp8.fp8_rowwise_matmul` (inputs already validated).

    `kernel` and `config` are for tests and benchmarks: force the TMA or the pointer kernel (the
    default picks TMA where `_tma_usable`), and one config instead of autotuning.
    """
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
    if m == 0 or n == 0:
        return c.reshape(*x_fp8.shape[:-1], n)
    if kernel is None:
        kernel = "tma" if _tma_usable(a, b, c) else "pointer"
    m_bucket = min(triton.next_power_of_2(m), 4096)
    forced = {} if config is None else {**config.kwargs, "num_warps": config.num_warps,
                                        "num_stages": config.num_stages}  # fmt: skip
    if kernel == "tma":
        if not _tma_usable(a, b, c):
            raise ValueError("the TMA kernel needs Hopper and 16-byte aligned rows (K % 16 == 0)")
        assert TensorDescriptor is not None
        num_programs = _num_programs(a.device)
        # Block shapes are placeholders until the config is known (`_set_block_shapes`).
        descs = {
            "a_desc": TensorDescriptor.from_tensor(a, [1, 16]),
            "b_desc": TensorDescriptor.from_tensor(b, [1, 16]),
            "c_desc": TensorDescriptor.from_tensor(c, [1, 16]),
        }
        tma_args = (a_scale, b_scale, bias_c, m, n, k, m_bucket)
        flags = {"HAS_BIAS": bias_c is not None, "PRECISE_ACC": PRECISE_ACC}

        def grid(meta: dict[str, int]) -> tuple[int]:
            tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
            return (min(num_programs, tiles),)

        if config is None:
            _fp8_matmul_tma_autotuned[grid](*descs.values(), *tma_args, **flags)
        else:
            _set_block_shapes({**descs, **config.kwargs})
            _fp8_matmul_tma_kernel[grid(config.kwargs)](
                *descs.values(), *tma_args, **flags, **forced
            )
        return c.reshape(*x_fp8.shape[:-1], n)

    def pointer_grid(meta: dict[str, int]) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    args = (a, b, c, a_scale, b_scale, bias_c, m, n, k, m_bucket, a.stride(0), a.stride(1),
            b.stride(0), b.stride(1), c.stride(0), c.stride(1))  # fmt: skip
    flags = {"HAS_BIAS": bias_c is not None, "PRECISE_ACC": PRECISE_ACC}
    if config is None:
        _fp8_matmul_pointer_autotuned[pointer_grid](*args, **flags)
    else:
        even_k = k % config.kwargs["BLOCK_K"] == 0
        _fp8_matmul_pointer_kernel[pointer_grid(config.kwargs)](
            *args, **flags, **forced, EVEN_K=even_k
        )
    return c.reshape(*x_fp8.shape[:-1], n)

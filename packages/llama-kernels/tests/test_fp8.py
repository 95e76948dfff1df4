"""FP8 row-wise quantization and matmul (§6.2): the Triton kernels against the PyTorch references,
both against independent oracles (hand-computed e4m3 values, float64 matmuls). The model recipe
(§6.2: which of a Llama's matmuls use FP8) is tested in llama-serve, where it lives.

Without a GPU the Triton kernels run under Triton's CPU interpreter (conftest.py), so the GEMM shapes
are small. Oracles: e4m3's value set is enumerated from torch's own float8 dtype (all 256 codes);
matmuls are checked against float64 products of the dequantized operands.
"""

from __future__ import annotations

import math
from typing import Literal

import pytest
import torch
from torch import nn

from llama_kernels.fp8 import (
    FP8_E4M3_MAX,
    SCALE_UB,
    Fp8RowwiseLinear,
    fp8_rowwise_matmul,
    fp8_rowwise_matmul_reference,
    quantize_fp8_rowwise,
    quantize_fp8_rowwise_reference,
)

BACKENDS = ["torch_backend", "triton_backend"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
E4M3 = torch.float8_e4m3fn


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Run the test once with the PyTorch reference and once with the Triton kernel."""
    request.getfixturevalue(request.param)
    return str(request.param)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def _e4m3_positive_values() -> torch.Tensor:
    """All finite positive e4m3 values, ascending (codes 0x01..0x7E; 0x7F is NaN)."""
    return torch.arange(1, 0x7F, dtype=torch.uint8).view(E4M3).double()


def _snr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    reference, approximation = reference.detach().double(), approximation.detach().double()
    noise = (reference - approximation).pow(2).sum()
    return float(10 * torch.log10(reference.pow(2).sum() / noise))


# ---------------------------------------------------------------------------------------------
# quantize_fp8_rowwise
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 123, 123), (3, 4095), (4, 1)])
def test_quantize_triton_matches_reference_bitwise(
    triton_backend: None, device: str, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    """The Triton quantizer gives the reference's fp8 bytes and scales exactly (odd shapes, dtypes,
    zero rows, rows of widely different magnitude)."""
    generator = torch.Generator().manual_seed(0)
    magnitudes = 10.0 ** torch.empty(shape[:-1]).uniform_(-3, 3, generator=generator)
    x = torch.randn(shape, generator=generator) * magnitudes[..., None]
    x.view(-1, shape[-1])[0] = 0.0  # an all-zero row
    x = x.to(device=device, dtype=dtype)
    x_fp8, scale = quantize_fp8_rowwise(x)
    ref_fp8, ref_scale = quantize_fp8_rowwise_reference(x)
    assert x_fp8.dtype == E4M3 and x_fp8.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0)
    mismatched = int((_bytes(x_fp8) != _bytes(ref_fp8)).sum())
    assert mismatched == 0, f"{mismatched} of {x.numel()} fp8 bytes differ from the reference"


def test_quantize_triton_chunks_rows_longer_than_one_block(
    triton_backend: None, device: str
) -> None:
    """Rows longer than the kernel's 8192-wide K block (405B's FFN width, 53248, is one) are read
    in chunks, twice: the row maximum may sit in any chunk, including the partial last one; bytes
    and scales still equal the reference's."""
    k = 2 * 8192 + 123  # two full chunks and a partial one
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, k, generator=generator)
    x[0, 100] = 50.0  # row maxima in the first, the middle and the partial last chunk
    x[1, 8192 + 7] = -60.0
    x[2, k - 1] = 70.0
    x = x.to(device)
    x_fp8, scale = quantize_fp8_rowwise(x)
    ref_fp8, ref_scale = quantize_fp8_rowwise_reference(x)
    torch.testing.assert_close(scale.cpu(), torch.tensor([50.0, 60.0, 70.0]) / FP8_E4M3_MAX)
    torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0)
    assert torch.equal(_bytes(x_fp8), _bytes(ref_fp8))


def test_quantize_reference_is_within_half_an_e4m3_step(torch_backend: None) -> None:
    """The reference's x / scale lands on the nearest e4m3 value (independent of the cast):
    the error is at most half the gap between the two e4m3 neighbours."""
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x_fp8, scale = quantize_fp8_rowwise(x.float())
    scaled = (x.float() / scale[:, None]).double().abs()  # [64, 256], within [0, 448]
    grid = torch.cat([torch.zeros(1, dtype=torch.float64), _e4m3_positive_values()])
    upper = torch.searchsorted(grid, scaled.flatten()).clamp(1, len(grid) - 1)
    gap = (grid[upper] - grid[upper - 1]).view_as(scaled)
    error = (x_fp8.double().abs() - scaled).abs()
    assert bool((error <= gap / 2).all()), f"max error / gap = {float((error / gap).max()):.3f}"


def test_quantize_rounds_ties_to_even(backend: str, device: str) -> None:
    """Midpoints between neighbouring e4m3 values round to the neighbour with an even code, and
    every e4m3 value maps to itself (scale 1: the row's maximum is 448)."""
    values = torch.cat(
        [torch.zeros(1, dtype=torch.float64), _e4m3_positive_values()]
    )  # codes 0..126
    midpoints = (values[:-1] + values[1:]) / 2  # exact in float32: one more mantissa bit
    even_codes = torch.arange(0, 126, dtype=torch.int64)
    even_codes = torch.where(even_codes % 2 == 0, even_codes, even_codes + 1)
    row = torch.cat([values, midpoints, -values, -midpoints]).float().to(device)  # [2 · 253]
    expected = torch.cat([torch.arange(127), even_codes]).to(torch.uint8)
    expected = torch.cat([expected, expected | 0x80]).to(device)  # negatives: the sign bit
    x_fp8, scale = quantize_fp8_rowwise(row[None, :])
    assert float(scale) == 1.0
    wrong = (_bytes(x_fp8[0]) != expected).nonzero().flatten()
    assert len(wrong) == 0, f"{backend}: inputs {row[wrong][:8].tolist()} rounded wrongly"


def test_quantize_zero_rows_are_finite(backend: str, device: str) -> None:
    """An all-zero row gets a tiny positive scale (not 0) and zero fp8 values: no NaN, no inf."""
    x = torch.zeros(3, 40, device=device)
    x[1] = torch.linspace(-2, 2, 40)
    x_fp8, scale = quantize_fp8_rowwise(x)
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    assert bool((x_fp8[0].float() == 0).all()) and bool((x_fp8[2].float() == 0).all())
    assert float(scale[1]) == pytest.approx(2 / FP8_E4M3_MAX)


def test_quantize_caps_the_scale_at_scale_ub(backend: str, device: str) -> None:
    """A row with max 5000 gets scale 1200/448 (§6.2's bound): values beyond 1200 saturate at
    ±448, smaller ones are unaffected; an ordinary row keeps scale max/448."""
    x = torch.tensor(
        [[5000.0, -5000.0, 1500.0, 600.0, -300.0, 1.0], [10.0, -4.0, 2.0, 1.0, 0.5, 0.0]],
        device=device,
    )
    x_fp8, scale = quantize_fp8_rowwise(x, scale_ub=SCALE_UB)
    assert SCALE_UB == 1200.0
    assert float(scale[0]) == torch.tensor(1200.0 / 448.0, dtype=torch.float32).item()
    assert float(scale[1]) == torch.tensor(10.0 / 448.0, dtype=torch.float32).item()
    assert x_fp8[0, :3].float().tolist() == [448.0, -448.0, 448.0]
    # 600 / (1200 / 448) = 224 and -300 / (1200 / 448) = -112, both exact in e4m3.
    assert x_fp8[0, 3:5].float().tolist() == [224.0, -112.0]
    assert float(x_fp8[1, 0]) == 448.0  # the uncapped row's maximum maps to 448


def test_quantize_nan_row_gets_nan_scale(backend: str, device: str) -> None:
    """A NaN makes its row's scale NaN (so the whole dequantized row is NaN); other rows are
    unaffected."""
    x = torch.ones(3, 70, device=device)
    x[:, ::3] = -2.0  # negative values in the NaN row too
    x[1, 37] = float("nan")
    x_fp8, scale = quantize_fp8_rowwise(x)
    assert math.isnan(float(scale[1]))
    expected = torch.tensor(2.0, dtype=torch.float32) / FP8_E4M3_MAX
    assert scale[[0, 2]].tolist() == [expected.item()] * 2
    # The NaN itself stays NaN in e4m3 (saturating clamps and rounding must not turn it into ±448
    # or 0), so the bytes agree with the reference's.
    reference_fp8, _ = quantize_fp8_rowwise_reference(x.cpu())
    assert torch.equal(x_fp8.cpu().view(torch.uint8), reference_fp8.view(torch.uint8))
    assert math.isnan(float(x_fp8[1, 37].float()))


def test_matmul_propagates_nan_to_bf16_output(backend: str, device: str) -> None:
    """A NaN activation row comes out of the bf16 matmul as NaN, never as a silent number."""
    x = torch.randn(4, 64, device=device)
    x[2, 5] = float("nan")
    w_fp8, w_scale = quantize_fp8_rowwise(torch.randn(32, 64, device=device))
    out = fp8_rowwise_matmul(*quantize_fp8_rowwise(x), w_fp8, w_scale, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.isnan(out[2]).all()
    assert torch.isfinite(out[[0, 1, 3]]).all()


# ---------------------------------------------------------------------------------------------
# fp8_rowwise_matmul
# ---------------------------------------------------------------------------------------------


def _quantized_operands(
    m: int, n: int, k: int, device: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=generator) * 3
    w = torch.randn(n, k, generator=generator) / math.sqrt(k)
    bias = torch.randn(n, generator=generator)
    x_fp8, x_scale = quantize_fp8_rowwise_reference(x)
    w_fp8, w_scale = quantize_fp8_rowwise_reference(w)
    return tuple(t.to(device) for t in (x_fp8, x_scale, w_fp8, w_scale, bias))  # type: ignore[return-value]


# Accumulation error allowed for the Triton GEMM, relative to the sum of |terms|. On the CPU the
# interpreter sums in fp32 (numpy). On a GPU, Hopper's fp8 tensor cores keep only about 14 bits while
# accumulating (truncating, so errors add up in one direction) before the kernel promotes each
# BLOCK_K chunk to fp32 (DeepSeek-V3 §3.3.2); an H100 showed up to about 2^-12.5, so allow 2^-10.
TRITON_ACCUMULATION_EPS = 2.0**-10 if torch.cuda.is_available() else None


def _check_against_float64(
    out: torch.Tensor,
    x_fp8: torch.Tensor,
    x_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    accumulation_eps: float | None = None,
) -> None:
    """|out − exact| within the accumulation error (default: fp32 summation, K+2 roundings, times
    the sum of |terms|) plus the rounding of the output dtype (half an ulp: 2^-24 relative for
    fp32, 2^-8 for bf16)."""
    x64 = x_fp8.double() * x_scale.double()[..., None]
    w64 = w_fp8.double() * w_scale.double()[:, None]
    exact = x64 @ w64.T + (0 if bias is None else bias.double())
    magnitude = x64.abs() @ w64.abs().T + (0 if bias is None else bias.double().abs())
    k = x_fp8.shape[-1]
    if accumulation_eps is None:
        accumulation_eps = (k + 2) * 2.0**-24
    half_ulp = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}[out.dtype]
    bound = accumulation_eps * magnitude + half_ulp * (exact.abs() + accumulation_eps * magnitude)
    excess = (out.double() - exact).abs() - bound
    worst = float((excess / magnitude).max())
    assert worst <= 0, f"error exceeds its bound by {worst:.3g} × the sum of |terms|"


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(("m", "n", "k"), [(5, 123, 96), (67, 130, 200)])
def test_matmul_triton_matches_reference(
    triton_backend: None,
    device: str,
    m: int,
    n: int,
    k: int,
    with_bias: bool,
    out_dtype: torch.dtype,
) -> None:
    """The Triton GEMM on odd shapes (partial tiles in M, N and K), with and without bias, in bf16
    and fp32, and the reference, are both within accumulation and output rounding error of a
    float64 product of the dequantized operands."""
    x_fp8, x_scale, w_fp8, w_scale, bias = _quantized_operands(m, n, k, device)
    b = bias if with_bias else None
    out = fp8_rowwise_matmul(x_fp8, x_scale, w_fp8, w_scale, bias=b, out_dtype=out_dtype)
    assert out.shape == (m, n) and out.dtype == out_dtype
    _check_against_float64(out, x_fp8, x_scale, w_fp8, w_scale, b, TRITON_ACCUMULATION_EPS)
    ref = fp8_rowwise_matmul_reference(x_fp8, x_scale, w_fp8, w_scale, b, out_dtype)
    _check_against_float64(ref, x_fp8, x_scale, w_fp8, w_scale, b)


def _tma_or_skip(kernel: str, device: str) -> None:
    if kernel == "tma" and device == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the TMA GEMM kernel needs Hopper (compute capability 9.0) or newer")


@pytest.mark.parametrize("kernel", ["tma", "pointer"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("m", "n", "k"), [(67, 136, 208), (5, 40, 96)])
def test_each_triton_gemm_kernel_matches_float64(
    triton_backend: None,
    device: str,
    kernel: Literal["tma", "pointer"],
    m: int,
    n: int,
    k: int,
    out_dtype: torch.dtype,
) -> None:
    """Both GEMM kernels, forced, on shapes the TMA kernel accepts (K % 16 == 0) with partial tiles
    in M, N and K, several tiles per persistent program, and a bias: within accumulation and output
    rounding error of the float64 product."""
    from llama_kernels._triton_fp8 import fp8_rowwise_matmul_triton

    _tma_or_skip(kernel, device)
    x_fp8, x_scale, w_fp8, w_scale, bias = _quantized_operands(m, n, k, device, seed=3)
    out = fp8_rowwise_matmul_triton(x_fp8, x_scale, w_fp8, w_scale, bias, out_dtype, kernel=kernel)
    assert out.shape == (m, n) and out.dtype == out_dtype
    _check_against_float64(out, x_fp8, x_scale, w_fp8, w_scale, bias, TRITON_ACCUMULATION_EPS)


def test_gemm_dispatch_needs_aligned_rows_for_tma(triton_backend: None, device: str) -> None:
    """The copy engine needs 16-byte aligned rows: K = 208 (fp8) and N = 136 (bf16 output) qualify,
    K = 200 and N = 130 fall back to the pointer kernel."""
    from llama_kernels._triton_fp8 import _tma_usable

    _tma_or_skip("tma", device)

    def usable(m: int, n: int, k: int) -> bool:
        a = torch.empty(m, k, dtype=E4M3, device=device)
        b = torch.empty(n, k, dtype=E4M3, device=device)
        c = torch.empty(m, n, dtype=torch.bfloat16, device=device)
        return _tma_usable(a, b, c)

    assert usable(67, 136, 208)
    assert not usable(67, 136, 200)
    assert not usable(67, 130, 208)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [4096, 16384])
def test_every_gemm_autotune_config_at_large_k(triton_backend: None, device: str, k: int) -> None:
    """Each autotuning candidate of both GEMM kernels, forced in turn (autotuning would only ever
    run the fastest), at the FFN's K sizes, where fp8 accumulation error adds up: all within the
    bound against float64."""
    if device != "cuda":
        pytest.skip("needs a CUDA device: the interpreter has a single small config")
    import triton

    from llama_kernels._triton_fp8 import (
        _pointer_configs,
        _tma_configs,
        _tma_usable,
        fp8_rowwise_matmul_triton,
    )

    m, n = 300, 264  # partial tiles for every config
    x_fp8, x_scale, w_fp8, w_scale, bias = _quantized_operands(m, n, k, device, seed=4)
    c = torch.empty(m, n, dtype=torch.bfloat16, device=device)
    kernels: dict[Literal["tma", "pointer"], list[triton.Config]] = {"pointer": _pointer_configs()}
    if _tma_usable(x_fp8, w_fp8, c):
        kernels["tma"] = _tma_configs()
    for kernel, configs in kernels.items():
        for config in configs:
            out = fp8_rowwise_matmul_triton(
                x_fp8, x_scale, w_fp8, w_scale, bias, torch.bfloat16, kernel=kernel, config=config
            )
            _check_against_float64(
                out, x_fp8, x_scale, w_fp8, w_scale, bias, TRITON_ACCUMULATION_EPS
            )


@pytest.mark.gpu
@pytest.mark.slow
def test_offsets_past_2_to_the_31_elements(triton_backend: None, device: str) -> None:
    """Activations and outputs of more than 2^31 elements (a 405B FFN over 128k tokens is 7e9):
    the kernels' offsets are 64-bit, so the last rows are quantized and multiplied correctly.
    Needs about 11 GB of GPU memory."""
    if device != "cuda":
        pytest.skip("needs a CUDA device with about 11 GB free")
    from llama_kernels._triton_fp8 import fp8_rowwise_matmul_triton

    k = n = 4096
    m = 2**31 // k + 192  # M·K and M·N both exceed 2^31
    generator = torch.Generator(device=device).manual_seed(6)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=generator)
    x_fp8, x_scale = quantize_fp8_rowwise(x)
    tail = slice(m - 256, m)
    ref_fp8, ref_scale = quantize_fp8_rowwise_reference(x[tail])
    torch.testing.assert_close(x_scale[tail], ref_scale, rtol=0, atol=0)
    assert torch.equal(_bytes(x_fp8[tail]), _bytes(ref_fp8))
    del x
    w_fp8, w_scale = quantize_fp8_rowwise(torch.randn(n, k, device=device) / math.sqrt(k))
    kernels: list[Literal["tma", "pointer"]] = ["pointer"]
    if torch.cuda.get_device_capability() >= (9, 0):
        kernels.append("tma")
    for kernel in kernels:
        out = fp8_rowwise_matmul_triton(
            x_fp8, x_scale, w_fp8, w_scale, None, torch.bfloat16, kernel=kernel
        )
        _check_against_float64(
            out[tail], x_fp8[tail], x_scale[tail], w_fp8, w_scale, None, TRITON_ACCUMULATION_EPS
        )
        del out


def test_matmul_flattens_leading_dims(backend: str, device: str) -> None:
    """x_fp8 [B, T, K] with x_scale [B, T] gives [B, T, N], the same as the flattened call."""
    x_fp8, x_scale, w_fp8, w_scale, bias = _quantized_operands(6, 40, 72, device)
    out_3d = fp8_rowwise_matmul(
        x_fp8.view(2, 3, 72), x_scale.view(2, 3), w_fp8, w_scale, bias=bias, out_dtype=torch.float32
    )
    out_2d = fp8_rowwise_matmul(x_fp8, x_scale, w_fp8, w_scale, bias=bias, out_dtype=torch.float32)
    assert out_3d.shape == (2, 3, 40)
    torch.testing.assert_close(out_3d.view(6, 40), out_2d, rtol=0, atol=0)


def test_quantized_matmul_snr_on_gaussian_data(backend: str, device: str) -> None:
    """quantize → matmul against a float64 matmul of the unquantized Gaussian inputs: at least
    25 dB. e4m3 keeps 3 mantissa bits, a relative rounding error of about 2^-4/√3 · 0.74 ≈ 2.7%
    RMS per operand, so two quantized operands give ≈ 28-29 dB."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(64, 256, generator=generator)
    w = torch.randn(96, 256, generator=generator)
    exact = x.double() @ w.double().T
    x_fp8, x_scale = quantize_fp8_rowwise(x.to(device))
    w_fp8, w_scale = quantize_fp8_rowwise(w.to(device))
    out = fp8_rowwise_matmul(x_fp8, x_scale, w_fp8, w_scale, out_dtype=torch.bfloat16)
    snr = _snr_db(exact, out.cpu())
    assert snr >= 25.0, f"SNR {snr:.2f} dB < 25 dB"
    assert snr < 35.0, f"SNR {snr:.2f} dB: suspiciously better than e4m3 allows (~28 dB)"


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------


def test_quantize_straight_through_gradient(torch_backend: None) -> None:
    """The gradient of a dequantized value x_fp8 · scale passes to x unchanged, and is zero where
    x exceeded scale_ub (saturated). Scales are powers of two so the float8 gradient is exact."""
    x = torch.tensor([[56.0, -3.0, 0.7, 1.0], [1000.0, -2.0, 300.0, -448.0]], requires_grad=True)
    upstream = torch.tensor([[1.0, -2.0, 0.5, 4.0], [3.0, 1.0, -1.0, 2.0]])
    x_fp8, scale = quantize_fp8_rowwise(x, scale_ub=448.0)  # scales: 56/448 = 2^-3 and 1
    (grad,) = torch.autograd.grad((x_fp8.float() * scale[:, None] * upstream).sum(), [x])
    expected = upstream.clone()
    expected[1, 0] = 0.0  # 1000 > scale_ub: saturated
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


def test_matmul_scale_and_bias_gradients(torch_backend: None) -> None:
    """Gradients w.r.t. x_scale, w_scale and bias match autograd through a float64 formula."""
    x_fp8, x_scale, w_fp8, w_scale, bias = _quantized_operands(7, 11, 24, "cpu")
    leaves = [t.clone().requires_grad_() for t in (x_scale, w_scale, bias)]
    upstream = torch.randn(7, 11, generator=torch.Generator().manual_seed(3))
    out = fp8_rowwise_matmul(
        x_fp8, leaves[0], w_fp8, leaves[1], bias=leaves[2], out_dtype=torch.float32
    )
    grads = torch.autograd.grad((out * upstream).sum(), leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in (x_scale, w_scale, bias)]
    product = x_fp8.double() @ w_fp8.double().T
    out64 = product * leaves64[0][:, None] * leaves64[1] + leaves64[2]
    expected = torch.autograd.grad((out64 * upstream.double()).sum(), leaves64)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_backward_through_fp8_operands_raises(torch_backend: None) -> None:
    """Backward through the float8 activations of an Fp8RowwiseLinear is refused with a message
    that says why and what to do."""
    layer = Fp8RowwiseLinear.from_linear(nn.Linear(16, 8))
    x = torch.randn(3, 16, requires_grad=True)
    out = layer(x)
    with pytest.raises(RuntimeError, match=r"no gradient for its float8 operands \(x_fp8"):
        torch.autograd.grad(out.sum(), [x])


def test_custom_ops_pass_opcheck(torch_backend: None) -> None:
    """torch.library.opcheck: the fake implementations and autograd registrations agree with the
    real ops, also under AOT dispatch with dynamic shapes. (opcheck's test_schema is left out: its
    mutation checker multiplies tensors, which torch does not implement for float8 on the CPU.)"""
    checks = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    x = torch.randn(5, 33)
    torch.library.opcheck(
        torch.ops.llama_kernels.quantize_fp8_rowwise.default, (x, 1200.0), test_utils=checks
    )
    x_fp8, x_scale, w_fp8, w_scale, bias = _quantized_operands(5, 7, 33, "cpu")
    torch.library.opcheck(
        torch.ops.llama_kernels.fp8_rowwise_matmul.default,
        (x_fp8, x_scale, w_fp8, w_scale, bias, torch.bfloat16),
        test_utils=checks,
    )


# ---------------------------------------------------------------------------------------------
# Fp8RowwiseLinear
# ---------------------------------------------------------------------------------------------


def test_fp8_linear_from_linear(device: str) -> None:
    """from_linear stores an e4m3 weight with one uncapped scale per output row and the bias; the
    forward returns the activations' dtype and tracks nn.Linear at e4m3 accuracy (> 25 dB)."""
    torch.manual_seed(4)
    linear = nn.Linear(96, 40).to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight[3] *= 1e5  # a weight row beyond scale_ub: weights are not capped
    layer = Fp8RowwiseLinear.from_linear(linear, scale_ub=SCALE_UB)
    assert (layer.in_features, layer.out_features) == (96, 40)
    assert layer.weight_fp8.dtype == E4M3 and layer.weight_fp8.shape == (40, 96)
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.shape == (40,)
    row3_max = linear.weight[3].detach().float().abs().max()
    assert float(layer.weight_scale[3]) == pytest.approx(float(row3_max) / FP8_E4M3_MAX)
    assert layer.bias is not None and torch.equal(layer.bias, linear.bias)
    assert repr(layer) == (
        "Fp8RowwiseLinear(in_features=96, out_features=40, bias=True, scale_ub=1200.0)"
    )
    x = torch.randn(2, 5, 96, device=device, dtype=torch.bfloat16)
    out = layer(x)
    assert out.shape == (2, 5, 40) and out.dtype == torch.bfloat16
    exact = x.double() @ linear.weight.double().T + linear.bias.double()
    snr = _snr_db(exact, out)
    assert snr > 25.0, f"SNR {snr:.2f} dB"


# Third-party noise: importing inductor imports torch.utils.mkldnn, which uses torch.jit.script_method.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_fp8_linear_compiles_fullgraph(torch_backend: None) -> None:
    """torch.compile(fullgraph=True) traces Fp8RowwiseLinear through both custom ops (inductor,
    CPU) and gives the eager result."""
    torch.manual_seed(5)
    layer = Fp8RowwiseLinear.from_linear(nn.Linear(48, 24, bias=True))
    x = torch.randn(4, 48)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors() -> None:
    """Shape mismatches name both shapes; wrong dtypes and scale_ub <= 0 are refused."""
    x_fp8, x_scale, w_fp8, w_scale, bias = _quantized_operands(4, 6, 8, "cpu")
    with pytest.raises(ValueError, match=r"x_fp8 has shape \(4, 8\), w_fp8 has shape \(6, 7\)"):
        fp8_rowwise_matmul(x_fp8, x_scale, w_fp8[:, :7], w_scale)
    with pytest.raises(TypeError, match=r"x_fp8 must be torch.float8_e4m3fn.*got torch.bfloat16"):
        fp8_rowwise_matmul(x_fp8.bfloat16(), x_scale, w_fp8, w_scale)
    with pytest.raises(TypeError, match=r"w_fp8 must be torch.float8_e4m3fn.*got torch.float32"):
        fp8_rowwise_matmul(x_fp8, x_scale, w_fp8.float(), w_scale)
    with pytest.raises(TypeError, match=r"x_scale must be float32, got torch.bfloat16"):
        fp8_rowwise_matmul(x_fp8, x_scale.bfloat16(), w_fp8, w_scale)
    with pytest.raises(ValueError, match=r"x_scale must have shape .*\(4,\).*got \(3,\)"):
        fp8_rowwise_matmul(x_fp8, x_scale[:3], w_fp8, w_scale)
    with pytest.raises(ValueError, match=r"w_scale must have shape \[N\] = \(6,\)"):
        fp8_rowwise_matmul(x_fp8, x_scale, w_fp8, w_scale[:5])
    with pytest.raises(ValueError, match=r"bias must have shape \[N\] = \(6,\), got \(5,\)"):
        fp8_rowwise_matmul(x_fp8, x_scale, w_fp8, w_scale, bias=bias[:5])
    with pytest.raises(TypeError, match=r"out_dtype must be .* got torch.int32"):
        fp8_rowwise_matmul(x_fp8, x_scale, w_fp8, w_scale, out_dtype=torch.int32)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=f"scale_ub must be > 0.*got {bad}"):
            quantize_fp8_rowwise(torch.ones(2, 3), scale_ub=bad)
    with pytest.raises(TypeError, match=r"x must be float32, bfloat16 or float16, got torch.int64"):
        quantize_fp8_rowwise(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"K >= 1, got shape \(2, 0\)"):
        quantize_fp8_rowwise(torch.ones(2, 0))
    layer = Fp8RowwiseLinear.from_linear(nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"expected input \[\.\.\., 8\], got shape \(2, 7\)"):
        layer(torch.ones(2, 7))

"""Tests for llama_kernels.rms_norm: Triton kernels and the PyTorch reference against float64 oracles.

Without a GPU the Triton kernels run under Triton's CPU interpreter (see conftest.py).

Tolerances are error bounds, element by element, built from `ulp(dtype)` = torch.finfo(dtype).eps, the
spacing of numbers at 1 (float32 2^-23, bfloat16 2^-7, float16 2^-10): rounding a value v to a dtype
moves it by at most ulp * |v| (half that when rounding to nearest; Triton's interpreter converts
float32 to bfloat16 by truncation, so a full ulp is allowed). Below the smallest normal number the
spacing is constant, `_tiny(dtype)`, which bounds the error there instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from llama_kernels.rms_norm import rms_norm, rms_norm_reference

EPS = 1e-5  # Llama 3's norm_eps (params.json of every Llama 3 model)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Odd rows and widths, a width one short of a power of two, Llama 3 405B's width, and width 1.
SHAPES = [(5, 123, 123), (3, 4095), (2, 16384), (1, 1), (7, 1)]
# Float32 statistics and sums: a sum of n <= 16,384 terms in blocks, then as a tree, plus rsqrt,
# carries a relative error of a few 1e-7; 1e-5 leaves margin and is still 800x below a bfloat16 ulp.
FP32_RTOL = 1e-5


def _ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _tiny(dtype: torch.dtype) -> float:
    """Spacing of the subnormal numbers: the most rounding moves a value below the normal range."""
    return torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps


def _inputs(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: str,
    seed: int,
    weight_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh random (x, weight, grad_out), the last in the output dtype."""
    gen = torch.Generator().manual_seed(seed)
    weight_dtype = weight_dtype or dtype
    x = (3.0 * torch.randn(shape, generator=gen)).to(dtype)
    weight = (1.0 + 0.5 * torch.randn(shape[-1], generator=gen)).to(weight_dtype)
    grad_out = torch.randn(shape, generator=gen).to(torch.promote_types(dtype, weight_dtype))
    return x.to(device), weight.to(device), grad_out.to(device)


class Oracle:
    """RMSNorm and its gradients in float64 by autograd on the textbook formula, plus error scales."""

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor) -> None:
        x64 = x.detach().cpu().double().requires_grad_(True)
        w64 = weight.detach().cpu().double().requires_grad_(True)
        dy64 = grad_out.detach().cpu().double()
        rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
        self.y = x64 * rstd * w64
        self.dx, self.dweight = torch.autograd.grad(self.y, (x64, w64), dy64)
        with torch.no_grad():
            self.y = self.y.detach()
            self.weight = w64.detach()
            self.grad_out = dy64
            xhat = x64 * rstd
            g = dy64 * w64
            # dx = rstd * (g - xhat * mean(g * xhat)): a difference, so its error scales with the terms
            # that cancel, not with dx itself.
            self.dx_scale = rstd * (g.abs() + xhat.abs() * (g * xhat).abs().mean(-1, keepdim=True))
            # dweight = sum over rows of grad_out * normed: its error scales with the sum of |terms|.
            self.dweight_scale = (dy64 * xhat).abs().reshape(-1, x.shape[-1]).sum(0)


def _assert_within(
    actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str
) -> None:
    """|actual - expected| <= bound element-wise, with a message naming the worst element."""
    err = (actual.detach().cpu().double() - expected).abs()
    excess = err - bound
    if excess.numel() and excess.max() > 0:
        i = int(excess.argmax())
        raise AssertionError(
            f"{what}: |error| {err.flatten()[i]:.3g} > bound {bound.flatten()[i]:.3g} at flat index {i} "
            f"(expected {expected.flatten()[i]:.6g}, got {actual.flatten()[i].item():.6g}); "
            f"{int((excess > 0).sum())} of {err.numel()} elements out of bound"
        )


def _forward_bound(oracle: Oracle, x_dtype: torch.dtype, w_dtype: torch.dtype) -> torch.Tensor:
    out_dtype = torch.promote_types(x_dtype, w_dtype)
    # Two roundings (normed to x's dtype, y to the output dtype) plus float32 statistics.
    relative = (_ulp(x_dtype) + _ulp(out_dtype) + FP32_RTOL) * oracle.y.abs()
    return relative + _tiny(x_dtype) * oracle.weight.abs() + _tiny(out_dtype)


def _dx_bound(oracle: Oracle, x_dtype: torch.dtype) -> torch.Tensor:
    # One rounding of dx to x's dtype, plus float32 arithmetic on the cancelling terms.
    return _ulp(x_dtype) * oracle.dx.abs() + FP32_RTOL * oracle.dx_scale + _tiny(x_dtype)


def _dweight_bound(oracle: Oracle, x_dtype: torch.dtype, w_dtype: torch.dtype) -> torch.Tensor:
    # Each term uses normed rounded to x's dtype (the value the forward multiplied by the weight):
    # up to one ulp of x's dtype per term; then float32 accumulation; then one rounding to w's dtype.
    scale = oracle.dweight_scale
    relative = (_ulp(x_dtype) + FP32_RTOL) * scale + _ulp(w_dtype) * oracle.dweight.abs()
    sum_dy = oracle.grad_out.abs().reshape(-1, scale.shape[0]).sum(0)
    return relative + _tiny(x_dtype) * sum_dy + _tiny(w_dtype)


def _run(
    x: torch.Tensor, weight: torch.Tensor, grad_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, dx, dweight) of rms_norm on the current backend."""
    x = x.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(True)
    y = rms_norm(x, weight, EPS)
    dx, dweight = torch.autograd.grad(y, (x, weight), grad_out)
    return y.detach(), dx, dweight


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_forward_matches_float64(
    shape: tuple[int, ...], dtype: torch.dtype, device: str, triton_backend: None
) -> None:
    """The Triton forward equals float64 RMSNorm up to two roundings and float32 statistics."""
    x, weight, grad_out = _inputs(shape, dtype, device, seed=0)
    y = rms_norm(x, weight, EPS)
    assert y.shape == x.shape and y.dtype == dtype
    oracle = Oracle(x, weight, grad_out)
    _assert_within(y, oracle.y, _forward_bound(oracle, dtype, dtype), "y")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_backward_matches_float64(
    shape: tuple[int, ...], dtype: torch.dtype, device: str, triton_backend: None
) -> None:
    """The Triton dx and dweight equal float64 autograd gradients within their error bounds."""
    x, weight, grad_out = _inputs(shape, dtype, device, seed=1)
    _y, dx, dweight = _run(x, weight, grad_out)
    assert dx.dtype == dtype and dweight.dtype == dtype
    oracle = Oracle(x, weight, grad_out)
    _assert_within(dx, oracle.dx, _dx_bound(oracle, dtype), "dx")
    _assert_within(dweight, oracle.dweight, _dweight_bound(oracle, dtype, dtype), "dweight")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_matches_torch_backend(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: str,
    select_backend: Callable[[str], None],
) -> None:
    """The Triton and PyTorch backends agree on y, dx and dweight (each may round once differently)."""
    pytest.importorskip("triton", reason="Triton is only installed on Linux")
    x, weight, grad_out = _inputs(shape, dtype, device, seed=2)
    select_backend("torch")
    y_ref, dx_ref, dw_ref = _run(x, weight, grad_out)
    select_backend("triton")
    y, dx, dweight = _run(x, weight, grad_out)
    # The same bounds as against float64, centred on the other backend: both sides round normed to
    # x's dtype (possibly one ulp apart), so the bounds on each side's error cover their difference.
    oracle = Oracle(x, weight, grad_out)
    _assert_within(y, y_ref.cpu().double(), 2 * _forward_bound(oracle, dtype, dtype), "y")
    _assert_within(dx, dx_ref.cpu().double(), 2 * _dx_bound(oracle, dtype), "dx")
    _assert_within(dweight, dw_ref.cpu().double(), 2 * _dweight_bound(oracle, dtype, dtype), "dw")


@pytest.mark.parametrize(
    ("x_dtype", "w_dtype"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.bfloat16),
    ],
    ids=str,
)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_dtypes_promote(
    x_dtype: torch.dtype,
    w_dtype: torch.dtype,
    backend: str,
    device: str,
    select_backend: Callable[[str], None],
) -> None:
    """With x and weight of different dtypes, y is promote_types(x, weight) and gradients keep theirs."""
    if backend == "triton":
        pytest.importorskip("triton", reason="Triton is only installed on Linux")
    select_backend(backend)
    x, weight, grad_out = _inputs((4, 37), x_dtype, device, seed=3, weight_dtype=w_dtype)
    y, dx, dweight = _run(x, weight, grad_out)
    assert (y.dtype, dx.dtype, dweight.dtype) == (
        torch.promote_types(x_dtype, w_dtype),
        x_dtype,
        w_dtype,
    )
    oracle = Oracle(x, weight, grad_out)
    _assert_within(y, oracle.y, _forward_bound(oracle, x_dtype, w_dtype), "y")
    _assert_within(dx, oracle.dx, _dx_bound(oracle, x_dtype), "dx")
    _assert_within(dweight, oracle.dweight, _dweight_bound(oracle, x_dtype, w_dtype), "dweight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(3, 123), (2, 64), (4, 1, 97)], ids=str)
def test_triton_chunked_rows_match_float64(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: str,
    triton_backend: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows wider than MAX_BLOCK (walked in chunks) give the same results as the single-pass path."""
    from llama_kernels import _triton_rms_norm

    monkeypatch.setattr(_triton_rms_norm, "MAX_BLOCK", 32)  # 64..123 columns: 2 to 4 chunks
    x, weight, grad_out = _inputs(shape, dtype, device, seed=4)
    y, dx, dweight = _run(x, weight, grad_out)
    oracle = Oracle(x, weight, grad_out)
    _assert_within(y, oracle.y, _forward_bound(oracle, dtype, dtype), "y")
    _assert_within(dx, oracle.dx, _dx_bound(oracle, dtype), "dx")
    _assert_within(dweight, oracle.dweight, _dweight_bound(oracle, dtype, dtype), "dweight")


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_dweight_accumulates_in_float32(
    weight_dtype: torch.dtype, device: str, triton_backend: None
) -> None:
    """dweight over 2,048 bfloat16 rows is summed in float32: a bfloat16 accumulator would be far off."""
    n_rows, hidden = 2048, 64
    gen = torch.Generator().manual_seed(5)
    # Positive x and grad_out: every term of the column sums is positive, so the sums grow to ~n_rows
    # and a bfloat16 accumulator (8 significant bits) stops absorbing terms of size ~1 near 256.
    x = (0.5 + torch.rand(n_rows, hidden, generator=gen)).to(torch.bfloat16)
    out_dtype = torch.promote_types(torch.bfloat16, weight_dtype)
    grad_out = (0.5 + torch.rand(n_rows, hidden, generator=gen)).to(out_dtype)
    weight = torch.ones(hidden, dtype=weight_dtype)
    # The backward op on its own, given rstd = 1: then normed = x exactly, and the float64 oracle is
    # the exact column sum of grad_out * x (no dependence on how the forward rounds).
    rstd = torch.ones(n_rows, dtype=torch.float32)
    _dx, dweight = torch.ops.llama_kernels.rms_norm_backward(
        grad_out.to(device), x.to(device), weight.to(device), rstd.to(device)
    )
    products = grad_out.double() * x.double()  # [n_rows, hidden]
    expected = products.sum(0)
    # float32 accumulation: relative error ~ sqrt(n_rows) * 2^-24 ~ 3e-6 (1e-4 in the very worst
    # case of sequential summation); rounding the result to weight's dtype adds up to one ulp of it.
    rtol = 1e-4 + _ulp(weight_dtype)
    assert dweight.dtype == weight_dtype
    _assert_within(dweight, expected, rtol * expected.abs(), "dweight")
    # The test has teeth: a sequential bfloat16 accumulation of the same products is off by far more.
    acc = torch.zeros(hidden, dtype=torch.bfloat16)
    for row in products.to(torch.bfloat16):
        acc += row
    bf16_error = ((acc.double() - expected).abs() / expected.abs()).max().item()
    assert bf16_error > 20 * rtol, (
        f"bfloat16 accumulation error {bf16_error:.3g} is not distinguishable"
    )


def test_non_contiguous_input(device: str, triton_backend: None) -> None:
    """A transposed (non-contiguous) x gives exactly the results of its contiguous copy."""
    x_t, weight, grad_out = _inputs((37, 6), torch.bfloat16, device, seed=6)
    x = x_t.t().contiguous().t()  # [37, 6] with strides (1, 37): hidden is not the fastest dim
    assert not x.is_contiguous()
    y, dx, dweight = _run(x, weight, grad_out)
    y_c, dx_c, dweight_c = _run(x.contiguous(), weight, grad_out)
    torch.testing.assert_close(y, y_c, rtol=0, atol=0)
    torch.testing.assert_close(dx, dx_c, rtol=0, atol=0)
    torch.testing.assert_close(dweight, dweight_c, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("needs", [(True, False), (False, True)], ids=["x_only", "weight_only"])
def test_gradient_flows_only_where_required(
    backend: str,
    needs: tuple[bool, bool],
    device: str,
    select_backend: Callable[[str], None],
) -> None:
    """When only x (or only weight) requires grad, backward fills exactly that gradient."""
    if backend == "triton":
        pytest.importorskip("triton", reason="Triton is only installed on Linux")
    select_backend(backend)
    x, weight, grad_out = _inputs((3, 16), torch.float32, device, seed=7)
    x.requires_grad_(needs[0])
    weight.requires_grad_(needs[1])
    torch.autograd.backward(rms_norm(x, weight, EPS), grad_out)
    assert (x.grad is not None, weight.grad is not None) == needs
    oracle = Oracle(x, weight, grad_out)
    if needs[0]:
        assert x.grad is not None
        _assert_within(x.grad, oracle.dx, _dx_bound(oracle, torch.float32), "dx")
    else:
        assert weight.grad is not None
        _assert_within(
            weight.grad, oracle.dweight, _dweight_bound(oracle, torch.float32, torch.float32), "dw"
        )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_rows(backend: str, device: str, select_backend: Callable[[str], None]) -> None:
    """An input with no rows gives an empty output and a zero weight gradient."""
    if backend == "triton":
        pytest.importorskip("triton", reason="Triton is only installed on Linux")
    select_backend(backend)
    x, weight, grad_out = _inputs((0, 3, 8), torch.bfloat16, device, seed=8)
    y, dx, dweight = _run(x, weight, grad_out)
    assert y.shape == dx.shape == (0, 3, 8)
    assert torch.equal(dweight, torch.zeros_like(weight))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_is_metas_formula(dtype: torch.dtype, torch_backend: None) -> None:
    """Both rms_norm (reference backend) and rms_norm_reference are bit-identical to Meta's RMSNorm."""

    def meta_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # RMSNorm.forward of llama_models/llama3/model.py, transcribed (importing it needs fairscale).
        def _norm(x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

        return _norm(x.float()).type_as(x) * weight

    x, weight, _ = _inputs((4, 5, 300), dtype, "cpu", seed=9)
    expected = meta_rms_norm(x, weight, EPS)
    torch.testing.assert_close(rms_norm(x, weight, EPS), expected, rtol=0, atol=0)
    torch.testing.assert_close(rms_norm_reference(x, weight, EPS), expected, rtol=0, atol=0)


def test_reference_gradcheck_float64(torch_backend: None) -> None:
    """The reference backward (the custom op's analytic gradient) passes gradcheck in float64."""
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(3, 2, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(7, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, EPS), (x, weight))


# Inductor's CPU path imports torch.utils.mkldnn, which warns at import time (torch's own noise).
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiles_without_graph_breaks(torch_backend: None) -> None:
    """torch.compile(fullgraph=True) traces through rms_norm; forward and backward match eager.

    Runs the reference backend on the CPU with the default Inductor backend (it compiles C++ with
    gcc): what is proved is that the custom op and its autograd formula trace without graph breaks.
    """

    def block(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(rms_norm(x, weight, EPS)) * 2.0

    compiled: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.compile(
        block, fullgraph=True
    )
    x, weight, grad_out = _inputs((2, 3, 32), torch.float32, "cpu", seed=11)
    results = []
    for fn in (block, compiled):
        xg, wg = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        y = fn(xg, wg)
        torch.autograd.backward(y, grad_out)
        results.append((y.detach(), xg.grad, wg.grad))
    for eager, comp in zip(*results, strict=True):
        torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("x_shape", "weight_shape", "dtype", "eps", "error", "match"),
    [
        (
            (2, 8),
            (7,),
            torch.float32,
            EPS,
            ValueError,
            r"weight has shape \(7,\) but x has hidden size 8",
        ),
        ((2, 8), (2, 8), torch.float32, EPS, ValueError, r"weight has shape \(2, 8\)"),
        ((2, 8), (8,), torch.int64, EPS, TypeError, "torch.int64"),
        ((2, 8), (8,), torch.float32, 0.0, ValueError, "got 0.0"),
        ((2, 8), (8,), torch.float32, -1e-5, ValueError, "got -1e-05"),
        ((2, 8), (8,), torch.float32, math.nan, ValueError, "got nan"),
        ((2, 0), (0,), torch.float32, EPS, ValueError, "non-empty last"),
    ],
)
def test_bad_inputs_raise_naming_the_value(
    x_shape: tuple[int, ...],
    weight_shape: tuple[int, ...],
    dtype: torch.dtype,
    eps: float,
    error: type[Exception],
    match: str,
) -> None:
    """Mismatched weight, a non-float dtype, eps <= 0 and an empty hidden dim fail with a clear message."""
    x = torch.zeros(x_shape, dtype=dtype)
    weight = torch.ones(weight_shape, dtype=torch.float32)
    with pytest.raises(error, match=match):
        rms_norm(x, weight, eps)
    with pytest.raises(error, match=match):
        rms_norm_reference(x, weight, eps)


def test_integer_weight_raises() -> None:
    """An integer weight is rejected, naming its dtype."""
    with pytest.raises(TypeError, match=r"weight has dtype torch.int32"):
        rms_norm(torch.zeros(2, 4), torch.ones(4, dtype=torch.int32), EPS)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_custom_ops_pass_opcheck(
    backend: str, device: str, select_backend: Callable[[str], None]
) -> None:
    """torch.library.opcheck: schema, fake (meta) shapes and dtypes, autograd registration, AOT."""
    if backend == "triton":
        pytest.importorskip("triton", reason="Triton is only installed on Linux")
    select_backend(backend)
    x, weight, grad_out = _inputs(
        (2, 3, 20), torch.bfloat16, device, seed=12, weight_dtype=torch.float32
    )
    x.requires_grad_(True)
    weight.requires_grad_(True)
    torch.library.opcheck(torch.ops.llama_kernels.rms_norm.default, (x, weight, EPS))
    _y, rstd = torch.ops.llama_kernels.rms_norm(x.detach(), weight.detach(), EPS)
    torch.library.opcheck(
        torch.ops.llama_kernels.rms_norm_backward.default,
        (grad_out, x.detach(), weight.detach(), rstd),
    )


def test_reference_inference_skips_the_custom_op_with_identical_results(
    torch_backend: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without autograd on the reference backend, rms_norm computes the op's function directly
    (no custom-op dispatch), bit for bit what the op returns."""
    import importlib

    module = importlib.import_module("llama_kernels.rms_norm")  # the attribute is the function

    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    w = torch.randn(64, dtype=torch.bfloat16)
    expected = torch.ops.llama_kernels.rms_norm(x, w, 1e-5)[0]

    def must_not_run(*args: object) -> None:
        raise AssertionError("the custom op ran on the inference fast path")

    monkeypatch.setattr(module, "_rms_norm_op", must_not_run)
    with torch.no_grad():
        got = module.rms_norm(x, w, 1e-5)
    assert torch.equal(got, expected)
    with pytest.raises(AssertionError, match="custom op ran"):
        module.rms_norm(x, w.requires_grad_(), 1e-5)  # gradients needed: the op (and its autograd)

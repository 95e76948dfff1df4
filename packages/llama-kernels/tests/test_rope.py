"""RoPE: the Triton kernel and the PyTorch reference against an independent float64 oracle.

The oracle rotates pairs as complex numbers (Meta's formulation): directly for the interleaved
layout, and after permuting half-split vectors to interleaved (and back) for the half-split layout.
Every side uses the same float32 angle `positions.float() * inv_freq` (the op's definition, shared
with Meta and Hugging Face); the oracle casts that float32 angle to float64 and takes cos, sin and
the rotation in float64. So the only differences left are float32 cos/sin and float32 arithmetic in
the op, and the final rounding to the output dtype — which is what the tolerances below allow.

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 on CPU tensors (see conftest.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from llama_kernels.rope import RopeLayout, apply_rope, apply_rope_reference, rope_frequencies

LAYOUTS: list[RopeLayout] = ["half_split", "interleaved"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
THETA = 500_000.0  # Llama 3, §3.2

# Forward and backward tolerances against the float64 oracle, per output dtype.
# float32: the op's float32 cos/sin are within ~2 ulp (2.4e-7) of the float64 cos/sin of the same
#   float32 angle, and two float32 products and a sum add a few ulp of |x| (inputs are N(0, 1), so
#   |x| < 6): the error stays below ~3e-6. atol=rtol=1e-5 leaves a margin of 3.
# bfloat16 / float16: the inputs are exact in float64, the op's float32 result is within ~3e-6 of
#   the oracle, then rounded once to the output dtype: at most half an ulp (2^-8 relative for
#   bfloat16's 8 significant bits, 2^-11 for float16's 11), and at most one ulp when the float32
#   error crosses a rounding boundary. So rtol is one ulp (2^-7, 2^-10); atol=1e-5 covers outputs
#   near zero, where the float32 error dominates the relative bound.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {  # (atol, rtol)
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-5, 2**-7),
    torch.float16: (1e-5, 2**-10),
}


def assert_close_within(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
) -> None:
    """assert_close in float64 with the tolerance of `dtype` above, times `scale`."""
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=scale * atol, rtol=scale * rtol
    )


# ---------------------------------------------------------------------------------------------
# The float64 oracle (independent of llama_kernels)
# ---------------------------------------------------------------------------------------------


def _oracle_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """The shared float32 angle, cast to float64: [B or 1, T, 1, head_dim/2]."""
    angles = (positions.to(torch.float32)[..., None] * inv_freq.to(torch.float32)).double()
    if angles.ndim == 2:
        angles = angles.unsqueeze(0)
    return angles.unsqueeze(2)


def _half_split_to_interleaved(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.stack((x[..., :half], x[..., half:]), dim=-1).flatten(-2)


def _interleaved_to_half_split(x: torch.Tensor) -> torch.Tensor:
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return torch.cat((pairs[..., 0], pairs[..., 1]), dim=-1)


def rope_oracle(
    x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, layout: str
) -> torch.Tensor:
    """Rotate x [B, T, H, D] in float64 as complex numbers x_pair · e^(i·angle)."""
    x64 = x.double()
    if layout == "half_split":
        x64 = _half_split_to_interleaved(x64)
    pairs = torch.view_as_complex(
        x64.reshape(*x64.shape[:-1], -1, 2).contiguous()
    )  # [B, T, H, D/2]
    angles = _oracle_angles(positions, inv_freq)
    rotated = torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2)
    return _interleaved_to_half_split(rotated) if layout == "half_split" else rotated


def _make_inputs(
    shape: tuple[int, int, int, int, int],
    dtype: torch.dtype,
    device: str,
    positions: torch.Tensor | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, seq_len, n_heads, n_kv_heads, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, n_heads, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(batch, seq_len, n_kv_heads, head_dim, generator=gen).to(device, dtype)
    if positions is None:
        positions = torch.arange(seq_len)
    inv_freq = rope_frequencies(head_dim, THETA, scaling_factor=8.0)
    return q, k, positions.to(device), inv_freq.to(device)


# Shapes (B, T, n_heads, n_kv_heads, head_dim) and positions, small for the interpreter.
_DOC_RESTARTS = torch.tensor([[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4]])  # packed documents
CASES = {
    "odd_heads": ((2, 5, 3, 1, 10), None),
    "long_seq": ((1, 123, 2, 1, 8), None),
    "llama8b_heads": ((1, 2, 32, 8, 128), None),
    "offset_1e5": ((1, 17, 4, 2, 64), torch.arange(100_000, 100_017)),
    "doc_restarts": ((2, 7, 4, 2, 16), _DOC_RESTARTS),
}


# ---------------------------------------------------------------------------------------------
# Forward and backward: Triton (and the reference) against the oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", list(CASES))
def test_triton_forward_matches_oracle(
    case: str, layout: RopeLayout, dtype: torch.dtype, device: str, triton_backend: None
) -> None:
    """The Triton kernel rotates q and k as the float64 complex-number oracle does."""
    shape, positions = CASES[case]
    q, k, positions, inv_freq = _make_inputs(shape, dtype, device, positions)
    q_rot, k_rot = apply_rope(q, k, positions, inv_freq, layout=layout)
    assert (q_rot.dtype, k_rot.dtype) == (dtype, dtype)
    assert_close_within(q_rot, rope_oracle(q, positions, inv_freq, layout), dtype)
    assert_close_within(k_rot, rope_oracle(k, positions, inv_freq, layout), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", ["odd_heads", "offset_1e5", "doc_restarts"])
def test_reference_forward_matches_oracle(
    case: str, layout: RopeLayout, dtype: torch.dtype, torch_backend: None
) -> None:
    """The PyTorch reference rotates q and k as the float64 complex-number oracle does."""
    shape, positions = CASES[case]
    q, k, positions, inv_freq = _make_inputs(shape, dtype, "cpu", positions)
    q_rot, k_rot = apply_rope(q, k, positions, inv_freq, layout=layout)
    assert_close_within(q_rot, rope_oracle(q, positions, inv_freq, layout), dtype)
    assert_close_within(k_rot, rope_oracle(k, positions, inv_freq, layout), dtype)


def _grads(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    layout: RopeLayout,
    grad_q: torch.Tensor,
    grad_k: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    q = q.detach().requires_grad_()
    k = k.detach().requires_grad_()
    q_rot, k_rot = apply_rope(q, k, positions, inv_freq, layout=layout)
    dq, dk = torch.autograd.grad((q_rot, k_rot), (q, k), (grad_q, grad_k))
    return dq, dk


def _oracle_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    layout: RopeLayout,
    grad_q: torch.Tensor,
    grad_k: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients by float64 autograd through the oracle (independent of the op's backward)."""
    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    outs = (
        rope_oracle(q64, positions, inv_freq, layout),
        rope_oracle(k64, positions, inv_freq, layout),
    )
    dq, dk = torch.autograd.grad(outs, (q64, k64), (grad_q.double(), grad_k.double()))
    return dq, dk


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", ["odd_heads", "llama8b_heads", "offset_1e5", "doc_restarts"])
def test_triton_backward_matches_oracle_and_reference(
    case: str,
    layout: RopeLayout,
    dtype: torch.dtype,
    device: str,
    triton_backend: None,
    select_backend: Callable[[str], None],
) -> None:
    """The Triton backward gives the oracle's gradients for q and k, and the reference's."""
    shape, positions = CASES[case]
    q, k, positions, inv_freq = _make_inputs(shape, dtype, device, positions)
    gen = torch.Generator().manual_seed(1)
    grad_q = torch.randn(q.shape, generator=gen).to(device, dtype)
    grad_k = torch.randn(k.shape, generator=gen).to(device, dtype)

    dq, dk = _grads(q, k, positions, inv_freq, layout, grad_q, grad_k)
    assert (dq.dtype, dk.dtype) == (dtype, dtype)
    want_dq, want_dk = _oracle_grads(q, k, positions, inv_freq, layout, grad_q, grad_k)
    assert_close_within(dq, want_dq, dtype)
    assert_close_within(dk, want_dk, dtype)

    # Triton against the reference: both are within the bound above of the oracle, so within
    # twice of each other (one ulp each way in bf16/fp16).
    select_backend("torch")
    ref_dq, ref_dk = _grads(
        q.cpu(), k.cpu(), positions.cpu(), inv_freq.cpu(), layout, grad_q.cpu(), grad_k.cpu()
    )
    assert_close_within(dq.cpu(), ref_dq, dtype, scale=2)
    assert_close_within(dk.cpu(), ref_dk, dtype, scale=2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_reads_strided_views(layout: RopeLayout, device: str, triton_backend: None) -> None:
    """Views of a fused QKV projection, a transposed [B, H, T, D] k, [B, T] positions with a
    batch stride, and [1, T] positions broadcast over the batch are all read correctly."""
    batch, seq_len, n_heads, n_kv_heads, head_dim = 2, 6, 3, 2, 8
    gen = torch.Generator().manual_seed(2)
    width = (n_heads + 2 * n_kv_heads) * head_dim
    qkv = torch.randn(batch, seq_len, width, generator=gen).to(device)  # a fused projection
    q = qkv[..., : n_heads * head_dim].view(batch, seq_len, n_heads, head_dim)
    k = (
        torch.randn(batch, n_kv_heads, seq_len, head_dim, generator=gen).to(device).transpose(1, 2)
    )  # [B, T, n_kv_heads, D], not contiguous
    assert not q.is_contiguous() and not k.is_contiguous()
    inv_freq = rope_frequencies(head_dim, THETA).to(device)
    strided_positions = torch.arange(2 * batch * seq_len).view(seq_len, 2 * batch).t()[::2]
    for positions in (strided_positions.to(device), torch.arange(7, 7 + seq_len)[None].to(device)):
        q_rot, k_rot = apply_rope(q, k, positions, inv_freq, layout=layout)
        assert_close_within(q_rot, rope_oracle(q, positions, inv_freq, layout), torch.float32)
        assert_close_within(k_rot, rope_oracle(k, positions, inv_freq, layout), torch.float32)
        assert q_rot.is_contiguous() and k_rot.is_contiguous()


def test_triton_backward_of_sum(device: str, triton_backend: None) -> None:
    """The gradient of a sum (an expanded tensor: every stride 0) is the inverse rotation of ones."""
    q, k, positions, inv_freq = _make_inputs((1, 4, 2, 1, 8), torch.float32, device)
    q.requires_grad_()
    k.requires_grad_()
    q_rot, k_rot = apply_rope(q, k, positions, inv_freq)
    dq, dk = torch.autograd.grad(q_rot.sum() + k_rot.sum(), (q, k))
    want_dq, want_dk = _oracle_grads(
        q, k, positions, inv_freq, "half_split", torch.ones_like(q), torch.ones_like(k)
    )
    assert_close_within(dq, want_dq, torch.float32)
    assert_close_within(dk, want_dk, torch.float32)


# Importing inductor imports torch.utils.mkldnn, which warns that torch.jit.script_method is
# deprecated: third-party noise, not ours (pytest runs with filterwarnings=error).
_IGNORE_INDUCTOR_IMPORT_WARNING = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)


# ---------------------------------------------------------------------------------------------
# The reference: gradcheck, custom-op registration, torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_gradcheck(layout: RopeLayout, torch_backend: None) -> None:
    """Float64 gradcheck and gradgradcheck of the op (reference backend) in q and k."""
    q, k, positions, inv_freq = _make_inputs((2, 3, 2, 1, 6), torch.float64, "cpu")
    q.requires_grad_()
    k.requires_grad_()

    def fn(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rope(q, k, positions, inv_freq, layout=layout)

    assert torch.autograd.gradcheck(fn, (q, k))
    assert torch.autograd.gradgradcheck(fn, (q, k))


def test_custom_ops_pass_opcheck(torch_backend: None) -> None:
    """torch.library.opcheck: schema, fake (meta) implementations and autograd registration."""
    q, k, positions, inv_freq = _make_inputs((2, 3, 2, 1, 6), torch.float32, "cpu")
    q.requires_grad_()
    k.requires_grad_()
    for op in (
        torch.ops.llama_kernels.apply_rope.default,
        torch.ops.llama_kernels.apply_rope_backward.default,
    ):
        for layout in LAYOUTS:
            torch.library.opcheck(op, (q, k, positions, inv_freq, layout))


@_IGNORE_INDUCTOR_IMPORT_WARNING
def test_torch_compile_fullgraph_matches_eager(torch_backend: None) -> None:
    """torch.compile(fullgraph=True) traces through apply_rope with no graph break, and the
    compiled forward and backward equal eager (reference backend, CPU, inductor)."""
    q, k, positions, inv_freq = _make_inputs((2, 5, 3, 1, 8), torch.float32, "cpu")

    def attention_inputs(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        q_rot, k_rot = apply_rope(q, k, positions, inv_freq)
        return (q_rot * 2.0).sum(dim=2) @ k_rot.sum(dim=2).transpose(1, 2)  # [B, T, T]

    compiled = torch.compile(attention_inputs, fullgraph=True)
    results = []
    for fn in (attention_inputs, compiled):
        q_in = q.detach().requires_grad_()
        k_in = k.detach().requires_grad_()
        out = fn(q_in, k_in, positions)
        dq, dk = torch.autograd.grad(out.square().sum(), (q_in, k_in))
        results.append((out, dq, dk))
    (out, dq, dk), (c_out, c_dq, c_dk) = results
    torch.testing.assert_close(c_out, out)
    torch.testing.assert_close(c_dq, dq)
    torch.testing.assert_close(c_dk, dk)


def test_reference_positions_broadcast_and_explicit_offsets_agree(torch_backend: None) -> None:
    """[T], [1, T] and [B, T] positions give the same rotation; rotating by position p of a
    longer sequence equals rotating a one-token step with positions=[p] (KV-cache decoding)."""
    q, k, _, inv_freq = _make_inputs((2, 6, 2, 1, 8), torch.float32, "cpu")
    positions = torch.arange(6)
    full = apply_rope(q, k, positions, inv_freq)
    for other in (positions[None], positions.expand(2, 6)):
        for a, b in zip(full, apply_rope(q, k, other, inv_freq), strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    step = apply_rope(q[:, 5:], k[:, 5:], torch.tensor([5]), inv_freq)
    torch.testing.assert_close(step[0], full[0][:, 5:], atol=0, rtol=0)
    torch.testing.assert_close(step[1], full[1][:, 5:], atol=0, rtol=0)


def test_reference_inverse_undoes_rotation() -> None:
    """Rotating by -angle after +angle gives back the input (float64)."""
    q, k, positions, inv_freq = _make_inputs((1, 5, 2, 2, 8), torch.float64, "cpu")
    for layout in ("half_split", "interleaved"):
        q_rot, k_rot = apply_rope_reference(q, k, positions, inv_freq, layout=layout)
        q_back, k_back = apply_rope_reference(
            q_rot,
            k_rot,
            positions,
            inv_freq,
            layout=layout,
            inverse=True,
        )
        torch.testing.assert_close(q_back, q)
        torch.testing.assert_close(k_back, k)


@pytest.mark.gpu
@_IGNORE_INDUCTOR_IMPORT_WARNING
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles the Triton kernel for a GPU")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_cuda_compiled_long_context(layout: RopeLayout, triton_backend: None) -> None:
    """On CUDA, under torch.compile, a Llama 3 8B-shaped bf16 batch at positions near 128K
    matches the oracle and the reference (cos/sin of large float32 angles on the GPU)."""
    positions = torch.arange(131_072 - 512, 131_072).view(2, 256)
    q, k, positions, inv_freq = _make_inputs(
        (2, 256, 32, 8, 128), torch.bfloat16, "cuda", positions
    )
    compiled = torch.compile(
        lambda q, k: apply_rope(q, k, positions, inv_freq, layout=layout), fullgraph=True
    )
    q_rot, k_rot = compiled(q, k)
    assert_close_within(q_rot, rope_oracle(q, positions, inv_freq, layout), torch.bfloat16)
    assert_close_within(k_rot, rope_oracle(k, positions, inv_freq, layout), torch.bfloat16)
    ref_q, ref_k = apply_rope_reference(q, k, positions, inv_freq, layout=layout)
    assert_close_within(q_rot, ref_q, torch.bfloat16, scale=2)
    assert_close_within(k_rot, ref_k, torch.bfloat16, scale=2)


# ---------------------------------------------------------------------------------------------
# rope_frequencies
# ---------------------------------------------------------------------------------------------


def _frequencies_oracle(head_dim: int, theta: float, factor: float | None) -> torch.Tensor:
    """Llama 3.1 scaling in float64, written as Meta's three branches, one frequency at a time."""
    low_freq_factor, high_freq_factor, original_max_seq_len = 1.0, 4.0, 8192
    low_freq_wavelen = original_max_seq_len / low_freq_factor
    high_freq_wavelen = original_max_seq_len / high_freq_factor
    out = []
    for i in range(0, head_dim, 2):
        freq = theta ** (-i / head_dim)
        wavelen = 2 * math.pi / freq
        if factor is None or wavelen < high_freq_wavelen:
            out.append(freq)
        elif wavelen > low_freq_wavelen:
            out.append(freq / factor)
        else:
            smooth = (original_max_seq_len / wavelen - low_freq_factor) / (
                high_freq_factor - low_freq_factor
            )
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize(("head_dim", "factor"), [(128, None), (128, 8.0), (64, 32.0), (128, 32.0)])
def test_rope_frequencies_match_float64_oracle(head_dim: int, factor: float | None) -> None:
    """Unscaled, Llama 3.1 (factor 8) and Llama 3.2 (factor 32) frequencies match the float64
    three-branch formula to float32 accuracy (pow and the interpolation in float32: ~1e-6)."""
    got = rope_frequencies(head_dim, THETA, scaling_factor=factor)
    assert got.dtype == torch.float32 and got.shape == (head_dim // 2,)
    torch.testing.assert_close(
        got.double(), _frequencies_oracle(head_dim, THETA, factor), atol=0, rtol=2e-6
    )


# float32 values of llama_model.rope.rope_frequencies(head_dim, 500000.0, RopeScaling(factor=...))
# as of llama-model commit c9729cb (computed once, pasted here: llama-kernels' tests run without
# llama-model installed). For factor 8 and head_dim 128, indices 29-34 are the interpolated band,
# 28 and below are kept, 35 and above are divided by the factor.
_PINNED = {
    (128, 8.0): {
        0: 1.0,
        1: 0.8146172165870667,
        28: 0.0032114461064338684,
        29: 0.0021665706299245358,
        30: 0.0013718936825171113,
        31: 0.0008567514596506953,
        32: 0.0005248460220173001,
        33: 0.0003126936499029398,
        34: 0.0001785077911335975,
        35: 9.556212171446532e-05,
        63: 3.068925877869333e-07,
    },
    (64, 32.0): {
        0: 1.0,
        14: 0.0032114461064338684,
        15: 0.0012905480107292533,
        16: 0.000429556705057621,
        17: 9.708286233944818e-05,
        18: 1.9461638657958247e-05,
        31: 9.418306490260875e-08,
    },
    (128, None): {
        0: 1.0,
        1: 0.8146172165870667,
        31: 0.0017360467463731766,
        63: 2.4551407022954663e-06,
    },
}


@pytest.mark.parametrize(("head_dim", "factor"), list(_PINNED))
def test_rope_frequencies_bit_identical_to_model_values(
    head_dim: int, factor: float | None
) -> None:
    """The frequencies are bit for bit those llama_model computed before it moved here."""
    got = rope_frequencies(head_dim, THETA, scaling_factor=factor)
    pinned = _PINNED[(head_dim, factor)]
    want = torch.tensor(list(pinned.values()), dtype=torch.float32)
    assert torch.equal(got[list(pinned)], want)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"head_dim": 7, "theta": THETA}, "got 7"),
        ({"head_dim": 8, "theta": 0.0}, "got 0.0"),
        ({"head_dim": 8, "theta": THETA, "scaling_factor": -1.0}, "got -1.0"),
        (
            {"head_dim": 8, "theta": THETA, "scaling_factor": 8.0, "low_freq_factor": 4.0},
            "low_freq_factor=4.0",
        ),
    ],
)
def test_rope_frequencies_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    """Bad head_dim, theta and scaling arguments raise errors naming the value."""
    with pytest.raises(ValueError, match=message):
        rope_frequencies(**kwargs)


# ---------------------------------------------------------------------------------------------
# Input errors
# ---------------------------------------------------------------------------------------------


def _bad(**changes: object) -> dict[str, object]:
    q, k, positions, inv_freq = _make_inputs((2, 5, 4, 2, 8), torch.float32, "cpu")
    args: dict[str, object] = {"q": q, "k": k, "positions": positions, "inv_freq": inv_freq}
    args.update(changes)
    return args


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (_bad(q=torch.randn(2, 5, 4, 7), k=torch.randn(2, 5, 2, 7)), ValueError, "even.*got 7"),
        (_bad(k=torch.randn(2, 5, 2, 6)), ValueError, "q has 8, k has 6"),
        (_bad(k=torch.randn(3, 5, 2, 8)), ValueError, r"\(2, 5\) and k \(3, 5\)"),
        (_bad(k=torch.randn(2, 4, 2, 8)), ValueError, r"\(2, 5\) and k \(2, 4\)"),
        (_bad(q=torch.randn(2, 5, 32)), ValueError, r"got shape \(2, 5, 32\)"),
        (_bad(positions=torch.arange(4)), ValueError, r"got shape \(4,\)"),
        (_bad(positions=torch.zeros(3, 5, dtype=torch.long)), ValueError, r"got shape \(3, 5\)"),
        (_bad(positions=torch.arange(5.0)), TypeError, "torch.float32"),
        (_bad(inv_freq=torch.ones(8)), ValueError, r"\[4\], got shape \(8,\)"),
        (_bad(inv_freq=torch.ones(4, dtype=torch.bfloat16)), TypeError, "bfloat16"),
        (_bad(q=torch.zeros(2, 5, 4, 8, dtype=torch.long)), TypeError, "torch.int64"),
    ],
    ids=[
        "odd_head_dim",
        "head_dim_mismatch",
        "batch_mismatch",
        "seq_mismatch",
        "q_not_4d",
        "positions_length",
        "positions_batch",
        "positions_float",
        "inv_freq_length",
        "inv_freq_dtype",
        "q_integer",
    ],
)
def test_apply_rope_rejects_bad_inputs(
    args: dict[str, Any], error: type[Exception], message: str
) -> None:
    """Malformed inputs raise errors that name the offending value."""
    with pytest.raises(error, match=message):
        apply_rope(**args)


def test_apply_rope_rejects_unknown_layout() -> None:
    """An unknown layout names itself and the valid ones."""
    q, k, positions, inv_freq = _make_inputs((1, 2, 1, 1, 4), torch.float32, "cpu")
    with pytest.raises(
        ValueError, match=r"layout must be one of \('half_split', 'interleaved'\), got 'meta'"
    ):
        apply_rope(q, k, positions, inv_freq, layout="meta")  # type: ignore[arg-type]


def test_reference_inference_skips_the_custom_op_with_identical_results(
    torch_backend: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without autograd on the reference backend, apply_rope computes the op's function directly
    (no custom-op dispatch), bit for bit what the op returns."""
    import llama_kernels.rope as module

    q, k = torch.randn(2, 7, 4, 16), torch.randn(2, 7, 2, 16)
    positions = torch.arange(7)
    inv_freq = module.rope_frequencies(16, 500_000.0, scaling_factor=8.0)
    expected = torch.ops.llama_kernels.apply_rope(q, k, positions, inv_freq, "half_split")

    def must_not_run(*args: object) -> None:
        raise AssertionError("the custom op ran on the inference fast path")

    monkeypatch.setattr(module, "_apply_rope_op", must_not_run)
    with torch.no_grad():
        got = module.apply_rope(q, k, positions, inv_freq)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    with pytest.raises(AssertionError, match="custom op ran"):
        module.apply_rope(q.requires_grad_(), k, positions, inv_freq)

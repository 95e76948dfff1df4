"""Rotary position embeddings (RoPE, Su et al. 2021, arXiv 2104.09864) with Llama 3.1 frequency scaling.

RoPE encodes a token's position by rotating each pair of coordinates of its query and key head
vectors by the angle `position · inv_freq[i]`, with `inv_freq[i] = θ^(-2i/head_dim)` for the
`head_dim / 2` pairs. Llama 3 uses θ = 500,000 (§3.2 of the Llama 3 paper, arXiv 2407.21783);
Llama 3.1 stretches the low frequencies for its 128K context (llama-models `apply_scaling`,
Hugging Face `_compute_llama3_parameters`): `rope_frequencies` computes both, and is the one
definition the model package uses.

Numerics follow Meta's reference and Hugging Face exactly where it matters for a checkpoint: the
angle is one float32 product `positions.float() * inv_freq`, cos and sin are taken in float32, the
rotation is done in float32 (float64 for float64 inputs) and the result is cast back to the input
dtype.

Pair layouts. A head vector of width `head_dim` is rotated in `head_dim / 2` pairs:

- `"half_split"` pairs (x[i], x[i + head_dim/2]): the Hugging Face layout, used by this project's
  model (`rotate_half` in transformers).
- `"interleaved"` pairs (x[2i], x[2i+1]): Meta's layout, where each pair is read as one complex
  number and multiplied by e^(i·angle) (`apply_rotary_emb` in llama-models).

The two are the same rotation up to a fixed permutation of the rows of wq and wk.

`apply_rope` is a custom op (`torch.ops.llama_kernels.apply_rope`, with a backward op that rotates
the incoming gradients by the negative angle), so `torch.compile(fullgraph=True)` traces through
it. It runs the Triton kernel (`_triton_rope.py`) on CUDA tensors and the PyTorch reference
elsewhere; `llama_kernels.set_backend` overrides that (see `_backend.py`). Float64 inputs
always run the reference: float64 exists for gradient checks and oracles, not for speed.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import torch

from llama_kernels._backend import backend_for

__all__ = ["RopeLayout", "apply_rope", "apply_rope_reference", "rope_frequencies"]

RopeLayout = Literal["half_split", "interleaved"]
"""Which coordinates form a rotation pair: (x[i], x[i + d/2]) or (x[2i], x[2i+1])."""

_LAYOUTS: tuple[str, ...] = get_args(RopeLayout)


# ---------------------------------------------------------------------------------------------
# Frequencies
# ---------------------------------------------------------------------------------------------


def _apply_llama31_scaling(
    inv_freq: torch.Tensor,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_seq_len: int,
) -> torch.Tensor:
    """Llama 3.1 long-context scaling of the inverse frequencies (llama-models `apply_scaling`).

    The float32 operations and their order are those of Meta's reference and Hugging Face, so the
    result is bit-identical to the frequencies a Llama 3.1 checkpoint was trained with.
    """
    low_freq_wavelen = original_max_seq_len / low_freq_factor
    high_freq_wavelen = original_max_seq_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq  # [head_dim/2]
    # Long wavelengths (low frequencies) are stretched by `factor`; short ones are kept.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    # In between, interpolate linearly in 1/wavelength between the scaled and unscaled value.
    smooth = (original_max_seq_len / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    interpolated = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, interpolated, scaled)


def rope_frequencies(
    head_dim: int,
    theta: float,
    *,
    scaling_factor: float | None = None,
    low_freq_factor: float = 1.0,  # llama-models `apply_scaling`: 1
    high_freq_factor: float = 4.0,  # llama-models `apply_scaling`: 4
    original_max_seq_len: int = 8192,  # Llama 3's pretraining context, §3.4.2
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The inverse frequencies θ^(-2i/head_dim), i < head_dim/2, as a float32 tensor [head_dim/2].

    `theta` is 500,000 for Llama 3 (§3.2). With `scaling_factor` set (8 for Llama 3.1, 32 for
    Llama 3.2 1B and 3B), wavelengths longer than `original_max_seq_len / low_freq_factor` are
    divided by the factor, those shorter than `original_max_seq_len / high_freq_factor` are kept,
    and the band in between is interpolated (Llama 3.1 scaling). Computed in float32 exactly as
    Meta's `precompute_freqs_cis` and Hugging Face's `_compute_llama3_parameters` do.
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    if not theta > 0:
        raise ValueError(f"theta must be positive, got {theta} (Llama 3 uses 500000.0)")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)  # [head_dim/2]
    if scaling_factor is None:
        return inv_freq
    if not scaling_factor > 0:
        raise ValueError(f"scaling_factor must be positive, got {scaling_factor} (Llama 3.1: 8)")
    if not 0 < low_freq_factor < high_freq_factor:
        raise ValueError(
            f"need 0 < low_freq_factor < high_freq_factor, got low_freq_factor={low_freq_factor}, "
            f"high_freq_factor={high_freq_factor} (Llama 3.1 uses 1 and 4)"
        )
    if original_max_seq_len <= 0:
        raise ValueError(f"original_max_seq_len must be positive, got {original_max_seq_len}")
    return _apply_llama31_scaling(
        inv_freq,
        float(scaling_factor),
        float(low_freq_factor),
        float(high_freq_factor),
        int(original_max_seq_len),
    )


# ---------------------------------------------------------------------------------------------
# PyTorch reference
# ---------------------------------------------------------------------------------------------


def _rotate_pairs(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str
) -> torch.Tensor:
    """Rotate the pairs of x [B, T, H, head_dim] by (cos, sin) [B or 1, T, 1, head_dim/2]."""
    x_c = x.to(cos.dtype)
    if layout == "half_split":
        x1, x2 = x_c.chunk(2, dim=-1)  # [B, T, H, head_dim/2] each
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        pairs = x_c.reshape(*x_c.shape[:-1], -1, 2)  # [B, T, H, head_dim/2, 2]
        x1, x2 = pairs[..., 0], pairs[..., 1]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    # Contiguous, as the Triton path and the fake implementation return.
    return out.to(x.dtype).contiguous()


def apply_rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    layout: RopeLayout = "half_split",
    inverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch reference of `apply_rope` (no input checks; `inverse` rotates by -angle).

    Runs on any device. The angle is the float32 product `positions.float() * inv_freq`; cos, sin
    and the rotation are float32, or float64 when the input is float64.
    """
    angles = positions.float()[..., None] * inv_freq  # [B or 1, T, head_dim/2] (or [T, ...])
    if angles.ndim == 2:
        angles = angles[None]  # [1, T, head_dim/2]
    angles = angles[:, :, None, :]  # [B or 1, T, 1, head_dim/2]: broadcast over heads
    compute = torch.float64 if torch.float64 in (q.dtype, k.dtype) else torch.float32
    cos, sin = angles.to(compute).cos(), angles.to(compute).sin()
    if inverse:
        sin = -sin
    return _rotate_pairs(q, cos, sin, layout), _rotate_pairs(k, cos, sin, layout)


# ---------------------------------------------------------------------------------------------
# Custom ops (forward, backward) and dispatch
# ---------------------------------------------------------------------------------------------


def _rotate(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    layout: str,
    inverse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the backend `backend_for(q)` picks (float64 always runs the reference)."""
    if backend_for(q) == "triton" and torch.float64 not in (q.dtype, k.dtype):
        from llama_kernels import _triton_rope  # lazy: Triton is imported on first use only

        return _triton_rope.rope_triton(
            q, k, positions, inv_freq, interleaved=layout == "interleaved", inverse=inverse
        )
    return apply_rope_reference(
        q,
        k,
        positions,
        inv_freq,
        layout="interleaved" if layout == "interleaved" else "half_split",
        inverse=inverse,
    )


@torch.library.custom_op("llama_kernels::apply_rope", mutates_args=())
def _apply_rope_op(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, layout: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate(q, k, positions, inv_freq, layout, inverse=False)


@torch.library.custom_op("llama_kernels::apply_rope_backward", mutates_args=())
def _apply_rope_backward_op(
    grad_q: torch.Tensor,
    grad_k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    layout: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate(grad_q, grad_k, positions, inv_freq, layout, inverse=True)


@_apply_rope_op.register_fake
def _(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, layout: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape)  # contiguous, like both implementations


@_apply_rope_backward_op.register_fake
def _(
    grad_q: torch.Tensor,
    grad_k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    layout: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return grad_q.new_empty(grad_q.shape), grad_k.new_empty(grad_k.shape)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    _, _, positions, inv_freq, layout = inputs
    ctx.save_for_backward(positions, inv_freq)
    ctx.layout = layout


def _apply_rope_grad(
    ctx: Any, grad_q: torch.Tensor, grad_k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, None, None, None]:
    # A rotation is orthogonal: its gradient is the rotation by the negative angle.
    positions, inv_freq = ctx.saved_tensors
    dq, dk = _apply_rope_backward_op(grad_q, grad_k, positions, inv_freq, ctx.layout)
    return dq, dk, None, None, None


def _apply_rope_backward_grad(
    ctx: Any, grad_dq: torch.Tensor, grad_dk: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, None, None, None]:
    # The backward is itself a rotation (by -angle); its gradient rotates by +angle again.
    positions, inv_freq = ctx.saved_tensors
    ddq, ddk = _apply_rope_op(grad_dq, grad_dk, positions, inv_freq, ctx.layout)
    return ddq, ddk, None, None, None


_apply_rope_op.register_autograd(_apply_rope_grad, setup_context=_setup_context)
_apply_rope_backward_op.register_autograd(_apply_rope_backward_grad, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, layout: str
) -> None:
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    for name, x in (("q", q), ("k", k)):
        if x.ndim != 4:
            raise ValueError(
                f"{name} must be [batch, seq, heads, head_dim], got shape {tuple(x.shape)}"
            )
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    head_dim = q.shape[-1]
    if head_dim == 0 or head_dim % 2:
        raise ValueError(
            f"head_dim must be even and positive to form rotation pairs, got {head_dim}"
        )
    if k.shape[-1] != head_dim:
        raise ValueError(f"q and k head_dim differ: q has {head_dim}, k has {k.shape[-1]}")
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"q and k must share [batch, seq], got q {tuple(q.shape[:2])} and k {tuple(k.shape[:2])}"
        )
    batch, seq_len = q.shape[:2]
    if (
        positions.dtype.is_floating_point
        or positions.dtype.is_complex
        or positions.dtype == torch.bool
    ):
        raise TypeError(f"positions must be an integer tensor, got {positions.dtype}")
    if not (
        (positions.ndim == 1 and positions.shape[0] == seq_len)
        or (
            positions.ndim == 2
            and positions.shape[0] in (1, batch)
            and positions.shape[1] == seq_len
        )
    ):
        raise ValueError(
            f"positions must be [seq] or [batch or 1, seq] = [{seq_len}] or [{batch}, {seq_len}], "
            f"got shape {tuple(positions.shape)}"
        )
    if inv_freq.ndim != 1 or inv_freq.shape[0] != head_dim // 2:
        raise ValueError(
            f"inv_freq must be [head_dim/2] = [{head_dim // 2}], got shape {tuple(inv_freq.shape)}"
        )
    if inv_freq.dtype != torch.float32:
        raise TypeError(
            f"inv_freq must be float32, got {inv_freq.dtype}; a module's .to(dtype) casts float "
            "buffers: keep it float32 (or recompute it with rope_frequencies)"
        )
    devices = {x.device for x in (q, k, positions, inv_freq)}
    if len(devices) > 1:
        raise ValueError(
            f"q, k, positions and inv_freq must be on one device, got q on {q.device}, k on "
            f"{k.device}, positions on {positions.device}, inv_freq on {inv_freq.device}"
        )


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    layout: RopeLayout = "half_split",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys by their positions: one fused op (one Triton launch) for both.

    q: [B, T, n_heads, head_dim]; k: [B, T, n_kv_heads, head_dim] (any head counts, e.g. GQA).
    Both may be strided views (e.g. of a fused QKV projection). positions: integer [T], [1, T] or
    [B, T] — explicit, so that KV-cached decoding passes its offsets and packed sequences restart
    at 0 per document. inv_freq: float32 [head_dim/2], from `rope_frequencies`. layout:
    "half_split" (Hugging Face, this project's model) or "interleaved" (Meta).

    Returns new contiguous tensors of the shapes and dtypes of q and k. Differentiable in q and k;
    positions and inv_freq get no gradient.
    """
    _check_inputs(q, k, positions, inv_freq, layout)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if not needs_grad and backend_for(q) != "triton":
        # Inference on the reference backend: what the op would run, without the custom-op
        # dispatch (tens of microseconds per call, which a CPU decode step feels).
        return _rotate(q, k, positions, inv_freq, layout, inverse=False)
    q_rot, k_rot = _apply_rope_op(q, k, positions, inv_freq, layout)
    return q_rot, k_rot
